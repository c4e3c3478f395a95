"""The shapes a data row comes in, and each one standardized into what a training method consumes.

    chat      {"conversations": [{"from", "value"}]} (ShareGPT) or {"messages": [{"role", "content"}]} (OpenAI)
    pair      {"prompt", "chosen", "rejected"} (TRL's explicit form: strings or message lists),
              {"chosen", "rejected"} as whole conversations (TRL's implicit form: the shared start is the prompt),
              {"input": {"messages"}, "preferred_output", "non_preferred_output"} (OpenAI's and Together's)
    unpaired  {"prompt", "completion", "label"} (KTO's: an answer marked desirable or not)
    alpaca    {"instruction", "input"?, "output", "system"?}
    prompt_completion  {"prompt", "completion"}: strings (raw text, no chat template) or message lists
    text      {"text"}: raw text for continued pretraining, every token trained
    task      {"prompt" | "messages", "assert"?, "reference"?, "id"?}: a prompt (a user text, or a conversation that
              ends with the user's turn) and the checks a right answer passes, in the evaluation suite's form

A method takes one family: `sft` chat rows (and alpaca, prompt/completion and text rows), `dpo`/`orpo`/`simpo`
pairs, `kto` unpaired rows (a pair gives one of each), `grpo` tasks. `data.format: auto` detects a row's shape by its fields;
a named format accepts only its own. `data.columns` renames a source's columns first. A row that fits no shape,
or breaks its shape's rules, raises BadRow saying how (the caller names the row).
"""
from __future__ import annotations

import itertools
import json
from typing import Any

from job import methods

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "bot": "assistant", "system": "system", "tool": "tool", "observation": "tool"}
# What each method trains on, and the formats a spec may name for it.
FAMILY = {m.name: m.family for m in methods.all_methods()}  # job/methods/ declares each method's family
FORMATS = {"sharegpt": "chat", "openai": "chat", "preference": "pair", "unpaired": "unpaired", "alpaca": "alpaca",
           "prompt_completion": "prompt_completion", "text": "text", "suite": "task"}
# The shapes each family trains on (the supervised family takes every shape that is not a preference).
TAKES = {"chat": ("chat", "alpaca", "prompt_completion", "text"), "pair": ("pair",), "unpaired": ("unpaired", "pair"),
         "task": ("task",)}
NOUNS = {"chat": ("a conversation", "conversations"), "pair": ("a preference pair", "preference pairs"),
         "unpaired": ("an unpaired example", "unpaired examples"), "alpaca": ("an alpaca row", "alpaca rows"),
         "prompt_completion": ("a prompt/completion row", "prompt/completion rows"), "text": ("a text row", "text rows"),
         "task": ("a task (a prompt and its checks)", "tasks (prompts and their checks)")}
EXPECTED = {"chat": "a conversation ('conversations' or 'messages')",
            "pair": "a preference pair (prompt/chosen/rejected, chosen/rejected conversations, or "
                    "input/preferred_output/non_preferred_output)",
            "unpaired": "an unpaired example (prompt/completion/label), or a preference pair",
            "alpaca": "an alpaca row (instruction, optional input, output)",
            "prompt_completion": "a prompt/completion row (prompt, completion)",
            "text": "a text row (text)",
            "task": "a task (prompt or messages, with assert checks and an optional reference)"}


# The fields each shape reads; any other column of a row is left unread (`unread`).
READS = {"chat": ("conversations", "messages", "tools"),
         "pair": ("prompt", "chosen", "rejected", "input", "preferred_output", "non_preferred_output"),
         "unpaired": ("prompt", "completion", "label"), "alpaca": ("instruction", "input", "output", "system"),
         "prompt_completion": ("prompt", "completion"), "text": ("text",),
         "task": ("id", "prompt", "messages", "assert", "reference")}
ALL_FIELDS = tuple(dict.fromkeys(f for fields in READS.values() for f in fields))


def unread(row: Any, shape: str) -> list[str]:
    """The columns of a row (as renamed by data.columns) that no field of `shape` reads."""
    if not isinstance(row, dict):
        return []
    return [str(name) for name in row if name not in READS[shape]]


def meant(name: str, fields: tuple[str, ...] = ALL_FIELDS) -> str | None:
    """The field a misspelt column name most likely meant ('inptu' -> 'input'), or None. Close spellings only:
    'answer' is not a misspelt 'assert'."""
    import difflib

    close = difflib.get_close_matches(name.lower(), fields, n=1, cutoff=0.75)
    return close[0] if close else None


# The names data sets give an alpaca row's fields (GSM8K's question/answer, Dolly's instruction/context/response,
# MetaMathQA's query/response, prompt/response sets, input/output pairs), most telling first: what
# `suggested_columns` reads a row that fits no shape as. An alpaca row is rendered with the model's chat template.
ALPACA_NAMES = {"instruction": ("instruction", "question", "query", "problem", "prompt", "user", "human", "source",
                                "input"),
                "output": ("output", "answer", "response", "solution", "completion", "target", "assistant", "gpt"),
                "input": ("input", "context")}


def suggested_columns(row: Any) -> dict[str, str] | None:
    """data.columns that read a row fitting no shape as an alpaca row, from its columns' common names (any case):
    {"instruction": "question", "output": "answer"}; None when its names say nothing."""
    if not isinstance(row, dict) or detect(row) is not None:
        return None
    names: dict[str, str] = {}
    for name in row:
        names.setdefault(str(name).strip().lower(), str(name))
    columns: dict[str, str] = {}
    for field in ("instruction", "output", "input"):
        found = next((names[c] for c in ALPACA_NAMES[field] if c in names and names[c] not in columns.values()), None)
        if found is not None:
            columns[field] = found
    if "instruction" not in columns or "output" not in columns:
        return None
    columns = {field: name for field, name in columns.items() if name != field}
    return columns if detect(renamed(row, columns)) == "alpaca" else None


def columns_hint(row: Any) -> str:
    """For a row that fits no shape: the data.columns that would read it as a shape, or which of its columns may
    be a field under another name."""
    if not isinstance(row, dict):
        return ""
    suggested = suggested_columns(row)
    if suggested:
        return f"; its columns read as an alpaca row (chat-templated) with data.columns {json.dumps(suggested)}"
    guesses = {field: str(name) for name in row if str(name) not in ALL_FIELDS and (field := meant(str(name)))}
    if guesses:
        return f"; a column under another name is mapped with data.columns, e.g. {json.dumps(guesses)}"
    return "; a column under another name is mapped with data.columns ({\"<field>\": \"<your column>\"})"


class BadRow(ValueError):
    """A row that breaks the rules of its shape; the message says how."""


def detect(row: dict) -> str | None:
    """The shape a row's fields say it is, or None."""
    if "assert" in row and ("prompt" in row or "messages" in row) or set(row) <= {"id", "prompt", "reference"} \
            and "prompt" in row:
        return "task"
    if "conversations" in row or "messages" in row:
        return "chat"
    if ("chosen" in row and "rejected" in row) or ("preferred_output" in row and "non_preferred_output" in row):
        return "pair"
    if "completion" in row and "label" in row and "prompt" in row:
        return "unpaired"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def shape_of(row: Any, fmt: str) -> str:
    """The shape a row is read as under `data.format` (auto: by its fields). Raises BadRow when none fits."""
    if not isinstance(row, dict):
        raise BadRow(f"not an object but {type(row).__name__}")
    found = detect(row)
    wanted = FORMATS.get(fmt)
    if wanted is not None and found != wanted:
        raise BadRow(f"is not {EXPECTED[wanted]} as data.format {fmt!r} says (has: {_fields(row)})")
    if found is None:
        raise BadRow(f"no 'conversations' or 'messages' field, nor a preference pair, an alpaca, prompt/completion or "
                     f"text row (has: {_fields(row)})")
    return found


def renamed(row: Any, columns: dict[str, str] | None) -> Any:
    """The row with `data.columns`'s renames applied ({"prompt": "question"}: the column 'question' is the prompt)."""
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for canonical, source in columns.items():
        if source in row:
            out[canonical] = row[source]
    return out


def _fields(row: dict) -> str:
    """A row's field names for a message: each cut to 40 characters, the first 12 of them."""
    names = [name if len(name) <= 40 else name[:40] + "..." for name in map(str, itertools.islice(row, 12))]
    return ", ".join(names) + (", ..." if len(row) > 12 else "") or "nothing"


REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # an assistant turn's thinking, beside its content


def turns(value: Any, where: str, default_role: str, text_key: str | None = None) -> list[dict]:
    """A list of {role, content} from a string (one turn of `default_role`) or a list of ShareGPT/OpenAI turns."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"{where} is empty")
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):  # a single message
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRow(f"{where} is empty or not a list of turns")
    messages = []
    for number, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRow(f"{where} turn {number} is not an object")
        role = ROLE_ALIASES.get(str(turn.get("role", turn.get("from"))).lower())
        content = turn.get(text_key) if text_key else turn.get("content", turn.get("value"))
        if role is None:
            raise BadRow(f"{where} turn {number} has no known role ({turn.get('role', turn.get('from'))!r})")
        calls = tool_calls(turn.get("tool_calls"), f"{where} turn {number}") if role == "assistant" else None
        if calls and content is None:
            content = ""
        if isinstance(content, list):
            content = text_of_parts(content, f"{where} turn {number}")
        if not isinstance(content, str):
            raise BadRow(f"{where} turn {number} content is {type(content).__name__}, not text")
        reasoning = next((turn[k] for k in REASONING_KEYS if isinstance(turn.get(k), str) and turn[k].strip()), None)
        if role == "assistant" and reasoning:  # written the way thinking models emit it, for data.thinking to see
            content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
        if not content.strip() and not calls:
            raise BadRow(f"{where} turn {number} ({role}) is empty")
        messages.append({"role": role, "content": content, **({"tool_calls": calls} if calls else {})})
    return messages


def text_of_parts(parts: list, where: str) -> str:
    """A turn's content given as OpenAI's and transformers' content parts ([{"type": "text", "text": ...}]), as the
    one text their chat templates render: the text parts joined as they stand. Any other part is refused, naming it:
    peftopt trains language models on text."""
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind == "text" and not isinstance(part.get("text"), str):
            raise BadRow(f"{where} content part {index} is a text part without a 'text' string")
        if kind != "text":
            described = f"of type {kind!r}" if isinstance(kind, str) else "that is not a text part"
            raise BadRow(f"{where} content part {index} is one {described}; peftopt reads text parts only")
        texts.append(part["text"])
    return "".join(texts)


def _embedded_json(text: str, what: str) -> Any:
    """A field that holds JSON as a string (tool schemas, tool-call arguments), parsed; BadRow when it is not JSON
    or is nested beyond what the parser can follow."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        raise BadRow(f"{what} is not JSON") from None
    except RecursionError:
        raise BadRow(f"{what} is nested too deeply") from None


def tool_calls(value: Any, where: str) -> list[dict] | None:
    """An assistant turn's tool calls in OpenAI's form ([{"type": "function", "function": {"name", "arguments"}}]),
    arguments as an object (a JSON string is parsed)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRow(f"{where}: tool_calls is not a list of calls")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if isinstance(arguments, str):
            arguments = _embedded_json(arguments, f"{where}: tool call {index} arguments")
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            raise BadRow(f"{where}: tool call {index} has no function name and arguments object")
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def check_order(messages: list[dict], where: str = "turn", need_assistant: bool = True) -> None:
    """An optional system turn, then user/assistant alternating (a prompt ends with the user); an assistant turn
    that calls tools is followed by one or more tool turns, then the assistant again."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    expected = ("user",)
    for number, message in enumerate(body):
        if message["role"] not in expected:
            raise BadRow(f"{where} {number + offset} is {message['role']!r} where {' or '.join(map(repr, expected))} "
                         "was expected (roles must alternate user/assistant; tool turns answer tool calls)")
        if message["role"] == "user":
            expected = ("assistant",)
        elif message["role"] == "assistant":
            expected = ("tool",) if message.get("tool_calls") else ("user",)
        else:
            expected = ("tool", "assistant")
    if need_assistant and not any(m["role"] == "assistant" for m in body):
        raise BadRow("no assistant turn to learn from")


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


# ------------------------------------------------------------------------------------------- shapes


def chat(row: dict, fmt: str, system_prompt: str | None):
    """One conversation as [{role, content}], system first; with a `tools` list (JSON schemas of the functions
    the assistant may call), {"messages": [...], "tools": [...]}."""
    if fmt in ("sharegpt", "auto") and "conversations" in row:
        messages = turns(row["conversations"], "conversations", "user", text_key=None)
    else:
        messages = turns(row["messages"], "messages", "user", text_key=None)
    messages = with_system(messages, system_prompt)
    check_order(messages)
    tools = row.get("tools")
    if tools is None:
        if any(m.get("tool_calls") for m in messages):
            raise BadRow("an assistant turn calls a tool but the row has no 'tools' list")
        return messages
    if isinstance(tools, str):  # some exports keep the schemas as a JSON string
        tools = _embedded_json(tools, "'tools'")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("'tools' is not a list of function schemas")
    return {"messages": messages, "tools": tools}


def _answer(value: Any, where: str) -> list[dict]:
    answer = turns(value, where, "assistant")
    if any(m["role"] != "assistant" for m in answer):
        raise BadRow(f"{where} holds a turn that is not the assistant's")
    return answer


def _prompt(value: Any, system_prompt: str | None) -> list[dict]:
    prompt = with_system(turns(value, "prompt", "user"), system_prompt)
    check_order(prompt, "prompt turn", need_assistant=False)
    if prompt[-1]["role"] != "user":
        raise BadRow("the prompt does not end with a user turn")
    return prompt


def _whole_conversation(value: Any) -> bool:
    """A chosen/rejected given as the whole conversation, user turns included (as UltraFeedback ships them)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and \
        ROLE_ALIASES.get(str(value[0].get("role", value[0].get("from"))).lower()) in ("user", "system")


def pair(row: dict, system_prompt: str | None) -> dict:
    """{"prompt": [...], "chosen": [assistant turns], "rejected": [assistant turns]}."""
    if "preferred_output" in row:
        source = row.get("input")
        if not isinstance(source, dict) or "messages" not in source:
            raise BadRow("'input' has no 'messages'")
        prompt = _prompt(source["messages"], system_prompt)
        chosen, rejected = _answer(row["preferred_output"], "preferred_output"), \
            _answer(row["non_preferred_output"], "non_preferred_output")
    elif "prompt" in row and not _whole_conversation(row["chosen"]):
        prompt = _prompt(row["prompt"], system_prompt)
        chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    else:  # implicit: two whole conversations that share their start
        whole_chosen, whole_rejected = turns(row["chosen"], "chosen", "user"), turns(row["rejected"], "rejected", "user")
        shared = 0
        while shared < min(len(whole_chosen), len(whole_rejected)) and whole_chosen[shared] == whole_rejected[shared]:
            shared += 1
        while shared and whole_chosen[shared - 1]["role"] != "user":  # the prompt ends where the answers start
            shared -= 1
        if not shared:
            raise BadRow("chosen and rejected share no prompt (TRL's implicit form starts both with the same turns)")
        prompt = _prompt(whole_chosen[:shared], system_prompt)
        chosen, rejected = _answer(whole_chosen[shared:], "chosen"), _answer(whole_rejected[shared:], "rejected")
    if chosen == rejected:
        raise BadRow("chosen and rejected are the same answer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def unpaired(row: dict, system_prompt: str | None) -> dict:
    """{"prompt": [...], "completion": [assistant turns], "label": bool}."""
    label = row["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0", "yes", "no"):  # a CSV's
        label = label.strip().lower() in ("true", "1", "yes")
    if not isinstance(label, bool):
        raise BadRow(f"label is {type(label).__name__}, not true/false")
    return {"prompt": _prompt(row["prompt"], system_prompt), "completion": _answer(row["completion"], "completion"),
            "label": label}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{where} is {type(value).__name__}, not text")
    if not value.strip():
        raise BadRow(f"{where} is empty")
    return value


def alpaca(row: dict, system_prompt: str | None) -> list[dict]:
    """An alpaca row as a conversation: the instruction (and the input after a blank line) asks, the output answers."""
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"input is {type(extra).__name__}, not text")
    system = row.get("system") if isinstance(row.get("system"), str) and row["system"].strip() else system_prompt
    question = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return with_system([{"role": "user", "content": question},
                        {"role": "assistant", "content": _text(row["output"], "output")}], system)


def prompt_completion(row: dict, system_prompt: str | None):
    """Strings: {"text_prompt", "text_completion"} (raw text, no chat template, the completion trained);
    message lists: the conversation of the prompt's turns and the completion's (the completion's turns trained)."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"text_prompt": _text(prompt, "prompt"), "text_completion": _text(completion, "completion")}
    return _prompt(prompt, system_prompt) + _answer(completion, "completion")


def text(row: dict) -> dict:
    return {"text": _text(row["text"], "text")}


def task(row: dict, system_prompt: str | None) -> dict:
    """{"prompt": [turns ending with the user's], "checks": the assert list as JSON text (one column type for every
    row, whatever its checks' values are), "reference": text or None, "id": text}. Each check is one the
    evaluation's catalog runs (job/evaluation/checks.py), with the value it needs."""
    import json

    from job.evaluation import checks

    source = row.get("messages", row.get("prompt"))
    prompt = turns(source, "messages" if "messages" in row else "prompt", "user")
    check_order(prompt, "prompt", need_assistant=False)
    if prompt[-1]["role"] != "user":
        raise BadRow("the prompt ends with the user's turn (the model answers it)")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise BadRow("'reference' is the expected answer's text")
    declared = row.get("assert", [])
    if not isinstance(declared, list):
        raise BadRow("'assert' is a list of checks, each {\"type\": ..., \"value\": ...}")
    for number, check in enumerate(declared):
        problem = checks.assertion_problem(check, reference)
        if problem:
            raise BadRow(f"assert[{number}]: {problem}")
    return {"prompt": with_system(prompt, system_prompt), "checks": json.dumps(declared, ensure_ascii=False),
            "reference": reference, "id": str(row.get("id", ""))}


def standardize(row: Any, fmt: str, system_prompt: str | None, family: str = "chat") -> list:
    """The examples a row gives a method of `family` (one, or two for a pair given to kto).

    Raises:
        BadRow: the row fits no shape, a shape the method cannot train on, or breaks its shape's rules.
    """
    shape = shape_of(row, fmt)
    if family == "chat" and shape in TAKES["chat"]:
        if shape == "alpaca":
            return [alpaca(row, system_prompt)]
        if shape == "prompt_completion":
            return [prompt_completion(row, system_prompt)]
        if shape == "text":
            return [text(row)]
        return [chat(row, fmt, system_prompt)]
    if family == "task" and (shape == "task" or shape == "chat" and "messages" in row and "conversations" not in row
                             and fmt != "openai"):
        return [task(row, system_prompt)]  # a conversation that ends with the user's turn is a task without checks
    if shape == "pair" and family == "pair":
        return [pair(row, system_prompt)]
    if shape == "unpaired" and family == "unpaired":
        return [unpaired(row, system_prompt)]
    if shape == "pair" and family == "unpaired":
        p = pair(row, system_prompt)
        return [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    wants = {"chat": "conversations (or alpaca, prompt/completion, text rows)"}.get(family, NOUNS[family][1])
    raise BadRow(f"is {NOUNS[shape][0]}, where this method trains on {wants}")


