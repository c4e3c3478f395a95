"""Chat templates: the built-in ones, how the spec picks one, and which tokens end an assistant turn.

The built-ins wrap each assistant turn in `{% generation %}` so that transformers can report assistant
masks; llama.cpp and transformers both accept the tag. `llama-3` is Llama 3's wire format without the
system block that Meta's 3.1/3.2 template always injects ("Cutting Knowledge Date: December 2023 ..."):
that block is where the seed notebook's "meta-prompt leakage" came from.
"""
from __future__ import annotations

import re

from job.errors import SpecError

LLAMA_3 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Gemma has no system role: a system message is put before the first user turn, as Google's template does.
GEMMA = (
    "{{ bos_token }}{% set system = namespace(text='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] | trim %}"
    "{% elif message['role'] == 'assistant' %}<start_of_turn>model\n"
    "{% generation %}{{ message['content'] | trim }}<end_of_turn>\n{% endgeneration %}"
    "{% else %}<start_of_turn>user\n{% if system.text %}{{ system.text }}\n\n{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# ChatML; with `tools`, the Hermes tool-use format Qwen 2.5 and Qwen 3 use (newlines right after a block tag are
# written as {{ '\n' }}: transformers renders with trim_blocks): the schemas in the system turn, the
# assistant's calls as <tool_call> JSON, a tool's result as a user turn inside <tool_response>. Without tools it
# renders exactly plain ChatML.
CHATML = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
    "\n\n{% endif %}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools %}"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] | trim }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}"
    "{% for call in message['tool_calls'] or [] %}{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|im_end|>\n{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Mistral's [INST] format as its Tekken tokenizers write it (Nemo, Small, v3 without the spaces of the older
# sentencepiece models): no assistant header, each reply ends with </s>. mistral-common puts the system prompt
# in the last [INST]; here it goes in the first, so that each turn's rendering is a prefix of the next (which the
# assistant masks rely on) and the Ollama template can say the same.
MISTRAL = (
    "{{ bos_token }}{% set system = namespace(text='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] | trim %}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}</s>{% endgeneration %}"
    "{% else %}[INST]{% if system.text %}{{ system.text }}\n\n{% set system.text = '' %}{% endif %}"
    "{{ message['content'] | trim }}[/INST]{% endif %}{% endfor %}"
)

# Phi-3 and Phi-3.5 (and Phi-4-mini's roles): <|role|> headers, <|end|> closing each turn.
PHI_3 = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Qwen 3: ChatML (with the Hermes tools of CHATML), every assistant turn opening with its think block, empty when
# the reply has none (as Qwen's template writes the last turn); `enable_thinking=False` puts the empty block in the
# generation prompt, so the model answers without thinking. Unlike Qwen's template, earlier turns keep their
# thinking: a turn's rendering must not change when later turns follow it.
QWEN_3 = CHATML.replace(
    "{% if message['role'] == 'assistant' %}{% generation %}",
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if not (message['content'] | trim).startswith('<think>') %}<think>\n\n</think>\n\n{% endif %}",
).replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)

BUILTIN = {"llama-3": LLAMA_3, "gemma": GEMMA, "chatml": CHATML, "mistral": MISTRAL, "phi-3": PHI_3, "qwen3": QWEN_3}
END_OF_TURN = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>", "<|endoftext|>", "</s>")
# the built-in for a tokenizer that has no template of its own, by config.json's model_type
ARCHITECTURE_DEFAULT = {"llama": "llama-3", "gemma3": "gemma", "gemma3_text": "gemma", "gemma2": "gemma",
                        "gemma": "gemma", "qwen2": "chatml", "qwen3": "qwen3", "qwen3_moe": "qwen3",
                        "mistral": "mistral", "mixtral": "mistral", "phi3": "phi-3"}

# Ollama speaks Go templates, not Jinja: one per built-in, for the Modelfile, rendering what the Jinja one renders
# after its BOS (llama.cpp adds that). Ollama hands a template every message, system ones included, and .System
# (all system messages joined): the system prompt goes where the Jinja template puts it. A newline that ends a
# turn is followed by `{{ end }}`, never `{{- end }}`, which would trim it.
OLLAMA = {
    "llama-3": (
        '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n'
    ),
    "gemma": (
        '{{- range $i, $_ := .Messages }}{{- if eq .Role "system" }}'
        '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        '{{ else }}<start_of_turn>user\n{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}'
        '{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n'
    ),
    "chatml": (
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
    ),
    "mistral": (
        '{{- range $i, $_ := .Messages }}{{- if eq .Role "system" }}'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>'
        '{{- else }}[INST]{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]'
        '{{- end }}{{- end }}'
    ),
    "phi-3": (
        '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'
    ),
    "qwen3": (
        '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if eq .Role "assistant" }}<think>\n\n</think>\n\n{{ end }}'
        '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
    ),
}


def ollama_template(name: str, enable_thinking: bool | None = None) -> str:
    """The Modelfile TEMPLATE for a built-in; with thinking off, a thinking model's prompt holds the empty think
    block, as the Jinja template's generation prompt does."""
    text = OLLAMA[name]
    if name == "qwen3" and enable_thinking is False:
        text += "<think>\n\n</think>\n\n"
    return text


THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def without_thinking(text: str) -> str:
    """An assistant reply with its leading <think>...</think> block removed (data.thinking 'drop')."""
    return THINK_BLOCK.sub("", text, count=1)


def choose(setting: str, tokenizer_template: str | None, model_type: str | None) -> tuple[str, str]:
    """Returns (name, jinja text) for the spec's `model.chat_template` setting.

    Raises:
        SpecError: the setting names a template that is not there.
    """
    if setting in BUILTIN:
        return setting, BUILTIN[setting]
    if setting.endswith(".jinja"):
        return "file", read_template(setting)
    if isinstance(tokenizer_template, dict):  # a base's named templates (additional_chat_templates/): its default
        tokenizer_template = tokenizer_template.get("default") if isinstance(tokenizer_template.get("default"), str) \
            else None
    if setting == "tokenizer" or (setting == "auto" and tokenizer_template):
        if not tokenizer_template:
            raise SpecError("model.chat_template: the tokenizer has no chat template; name one "
                            f"({', '.join(BUILTIN)}) or a .jinja file")
        return "tokenizer", tokenizer_template
    name = ARCHITECTURE_DEFAULT.get(model_type or "", "chatml")
    return name, BUILTIN[name]


MAX_TEMPLATE_BYTES = 1024 * 1024


def read_template(path: str) -> str:
    """A chat-template file's text. Raises SpecError: not a regular file, too large, or not UTF-8."""
    from job.inputs import read_regular_file

    raw = read_regular_file(path, MAX_TEMPLATE_BYTES, "model.chat_template")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"model.chat_template: {path} is not UTF-8") from None


def file_problems(path: str) -> list[str]:
    """Preflight: a chat-template file reads and renders a conversation with the messages in it, within the
    guarded renderer's time and memory (job/render.py)."""
    from job import render

    try:
        text = read_template(path)
    except SpecError as exc:
        return [exc.message]
    sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    [result] = render.render(text, [{"messages": sample}], {"bos_token": "<s>", "eos_token": "</s>"})
    if "error" in result:
        return [f"model.chat_template: {path} does not render a conversation: rendering a three-turn conversation "
                f"{render.why(result)}"]
    rendered = result["text"]
    if "u" not in str(rendered) or "a" not in str(rendered):
        return [f"model.chat_template: {path} leaves the messages out of what it renders"]
    return []


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes a tool's schema and a tool call into what it renders."""
    probe = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "peftopt_probe_call", "arguments": {"x": 1}}}]},
             {"role": "tool", "content": "peftopt_probe_result"}]
    schema = [{"type": "function", "function": {"name": "peftopt_probe_schema", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}]
    from job import render

    [result] = render.chat(tokenizer, [{"messages": probe, "tools": schema}])
    if "error" in result:  # the template's own refusals (raise_exception), Jinja's errors, its limits
        return False
    text = result["text"]
    return all(word in text for word in ("peftopt_probe_schema", "peftopt_probe_call", "peftopt_probe_result"))


def stop_strings(template_text: str, eos_token: str | None) -> list[str]:
    """Tokens that end an assistant turn: those the template writes, plus the tokenizer's EOS."""
    stops = [s for s in END_OF_TURN if s in template_text]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return stops
