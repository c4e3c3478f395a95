"""Runs one tiny unsloth job on the GPU machine and prints where it failed (a debugging aid)."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

work = Path(tempfile.mkdtemp())
model = tiny.make_model(work / "model")
data = tiny.write_data(work / "data.jsonl")
overrides = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
spec = {"name": "dbg", "output_dir": str(work / "runs"),
        "model": {"base": str(model), "max_seq_length": 128, "chat_template": "llama-3", "dtype": "bfloat16",
                  **overrides.get("model", {})},
        "data": {"source": str(data)}, "lora": {"r": 8, "alpha": 16},
        "train": {"backend": "unsloth", "max_steps": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                  "save_steps": 2, **overrides.get("train", {})},
        "evaluate": {"prompts": ["Say hello."], "max_new_tokens": 8, "targets": ["base", "adapter"]},
        **({"export": overrides["export"]} if "export" in overrides else {})}
(work / "s.json").write_text(json.dumps(spec))
out = subprocess.run([sys.executable, "-m", "job", "run", str(work / "s.json")], capture_output=True, text=True,
                     env={**__import__("os").environ, "PEFTOPT_LOG_FORMAT": "json"})
for line in out.stdout.splitlines():
    try:
        event = json.loads(line)
    except ValueError:
        print("RAW", line[:300])
        continue
    if event.get("event") in ("job_crashed", "job_failed"):
        print("ERROR", event.get("error"), "stage", event.get("stage"))
        for exc in event.get("exception", []):
            for frame in exc.get("frames", [])[-12:]:
                print("  ", frame["filename"].split("site-packages/")[-1].split("/s/site/")[-1], frame["lineno"], frame["name"])
    elif event.get("event") in ("stage_finished", "backend_chosen", "train_started", "batch_plan"):
        print(event.get("event"), {k: v for k, v in event.items() if k not in ("timestamp", "logger", "level")})
print("rc", out.returncode)
print(out.stderr[-1500:])
