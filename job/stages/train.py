"""Train the LoRA adapter with the backend the spec picks, resuming from the newest complete checkpoint."""
from __future__ import annotations

from job import backends
from job.log import get_logger
from job.metrics import peak_rss_gb
from job.rundir import RunDir, read_json
from job.spec import JobSpec

log = get_logger("peftopt.train")


def run(spec: JobSpec, run_dir: RunDir, ctx) -> dict:
    device = backends.device()
    name, why = backends.choose(spec.train.backend, device, spec.lora)
    log.info("backend_chosen", backend=name, why=why, device=device)
    figures = backends.load(name).train(spec, run_dir, device, restart=ctx.restart)
    previous = (read_json(run_dir.metrics_path) or {}).get("train", {})
    # A resumed run adds this session to the time and tokens of the sessions before it.
    sessions = list(previous.get("sessions", [])) + [
        {"runtime_s": figures["session_runtime_s"], "tokens": figures["session_tokens"],
         "from_step": figures.get("resumed_from_step") or 0, "to_step": figures["global_step"]}]
    runtime = sum(s["runtime_s"] for s in sessions)
    tokens = sum(s["tokens"] for s in sessions)
    figures.update(sessions=sessions, runtime_s=round(runtime, 3), tokens=tokens,
                   tokens_per_s=round(tokens / runtime, 1) if runtime else None, peak_rss_gb=peak_rss_gb(),
                   backend_reason=why)
    if "peak_gpu_gb" in figures:
        import torch

        gpu = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(gpu).total_memory / 1024**3
        figures.update(gpu_name=torch.cuda.get_device_name(gpu), gpu_memory_gb=round(total, 3),
                       peak_gpu_share=round(figures["peak_gpu_gb"] / total, 4),
                       lora_gpu_share=round(figures["lora_gpu_gb"] / total, 4))
    log.info("train_finished", **{k: v for k, v in figures.items() if k not in ("loss_curve", "sessions")})
    return {"artifacts": ["adapter"], "metrics": figures}
