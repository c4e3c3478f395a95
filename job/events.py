"""Every event name peftopt logs, with when it is logged: the one list (docs/reference/events.md is generated from
it by job/docgen.py, and tests/unit/test_events.py walks the events of real runs against it). Names are stable: a log
pipeline may key on them. Each JSON line also has `level`, `logger` and `timestamp`, and `run` and `stage` once
they are known.
"""
from __future__ import annotations

EVENTS: dict[str, str] = {
    # the job and its stages
    "job_started": "the job starts: run directory, stages, attempt, settings, versions, hardware",
    "job_finished": "the job ends with every stage done",
    "job_failed": "the job ends with exit 2, 3 or 4 (`error`, `exit_code`)",
    "job_interrupted": "the job ends with exit 75 (a stop request, or a lost rank)",
    "job_crashed": "the job ends with exit 1: a bug, with its traceback",
    "stage_started": "a stage starts",
    "stage_finished": "a stage finishes (runtime, artifacts)",
    "stage_skipped": "a stage was already done for these inputs",
    "stage_ahead_started": "a stage's work started in a child process of its own (`pid`) while the job's process "
                           "does other work (PEFTOPT_PREPARE_AHEAD); its events follow as the job's own",
    "stage_ahead_failed": "that child process ended without the stage's result (`error`): the stage runs in the "
                          "job's process",
    "run_restarted": "`--restart` redoes the stages whose inputs changed",
    "artifact_missing": "a finished stage's artifact is gone; the stage runs again",
    "stop_requested": "SIGTERM or SIGINT (or, by=another rank, a signal to another rank of the run): train saves at "
                      "its next safe point, any other stage stops at once",
    "grace_expired": "the grace period ran out before a safe point: exiting 75",
    "single_gpu": "a single process on a machine with several GPUs uses the first",
    # the base model
    "base_materialized": "a GGUF or packaged base model was turned into a trainable model directory (`from_cache`)",
    "base_building": "inspect builds a GGUF or packaged base once, into the base cache",
    "base_cache_used": "a base was copied from the machine's base cache, every file checked against its digest",
    "base_cache_stored": "a built base was kept in the base cache for the next runs",
    "base_cache_refused": "a base cache entry failed its check (changed, a link, a bad manifest): the base is built again",
    "base_cache_unwritable": "the base cache could not be written: the base is kept in this run only",
    "model_file_refused": "a base model file that is a link out of its directory (or not a regular file) was not copied",
    # data
    "data_prepared": "rows read, skipped, truncated, tokens and trainable tokens, per part and per source",
    "data_columns_unused": "a data source has columns no field of its rows' shape reads (per column: rows, and the "
                           "field it may have meant)",
    # training
    "backend_imported": "unsloth imported before any stage's work (`seconds`), beside prepare's child process",
    "backend_chosen": "the training backend and why",
    "kernels_ahead_started": "a child process (`pid`) compiles the training step's Triton kernels (unsloth's, or on hf "
                             "Liger's and trl's loss head) into the job's own cache while the job imports, prepares "
                             "and loads (PEFTOPT_KERNELS_AHEAD)",
    "kernels_compiled_ahead": "what that child did, logged when the job ends: `seconds` and made-up `steps`, or why "
                              "it did nothing (`skipped`: no room on the GPU) or stopped (`error`); `timeline`: the "
                              "seconds from its start at which its import, its model and each step were done",
    "batch_plan": "micro-batch, accumulation, checkpointing and the memory estimate",
    "model_sharded": "train.parallel fsdp: the ranks that read the base's weights (rank 0 alone unless it is 4-bit), "
                     "the bytes of weights and of LoRA parameters each rank holds, and the local shape of one LoRA "
                     "matrix on each rank",
    "base_dequantized": "the batch plan dequantizes a 4-bit base once to 16-bit: layers replaced, GiB before and after",
    "optimizer_substituted": "an 8-bit optimizer asked for on CPU: adamw_torch is used",
    "embedding_learning_rate": "`train.embedding_learning_rate`: the fully trained modules and the rate they train at",
    "train_started": "training starts: `max_steps` (counted from `epochs` when the spec gives those), the attention "
                     "path, kernels, base weights",
    "train_progress": "a logged step: `step`, `max_steps`, `loss`, `learning_rate`, `tokens`, `tokens_per_s`, `eta_s`; "
                      "under grpo also `reward` (the weighted mean), `reward_std`, `rewards` (each reward function's "
                      "mean), `pass_rates` (each check type's), `completion_length` (tokens) and `kl` (with beta). "
                      "Outside grpo a step's event comes when the next step ends (its loss is read from the GPU then), "
                      "at once for a step that saves a checkpoint or ends training",
    "train_finished": "the run's training figures (summed over resumed sessions)",
    "train_resumed": "resuming from a checkpoint",
    "checkpoint_saved": "a checkpoint was written",
    "checkpoint_incomplete": "a torn checkpoint was removed",
    "checkpoint_refused": "a checkpoint that does not load, or whose marker names another training, was removed (or not "
                          "restored)",
    "checkpoint_synced": "`train.checkpoint_sync`: a checkpoint reached the Hub",
    "checkpoint_sync_failed": "`train.checkpoint_sync`: an upload failed (training goes on)",
    "checkpoint_sync_unfinished": "`train.checkpoint_sync`: the grace period ended before the last upload",
    "checkpoint_restored": "`train.checkpoint_sync`: a remote checkpoint was restored",
    "checkpoint_sync_incomplete": "`train.checkpoint_sync`: a remote checkpoint was skipped as incomplete",
    "checkpoint_sync_foreign": "`train.checkpoint_sync`: a remote checkpoint belongs to another training",
    "ranks_not_released": "data-parallel: rank 0 could not tell a rank that already left to exit",
    # evaluation
    "target_evaluated": "a target's answers were checked (pass rates, timing)",
    "target_answered_ahead": "the base or adapter target answered on the GPU while merge and gguf ran (`load_s`, "
                             "`generate_s`); evaluate records it in its turn",
    "answers_ahead_failed": "answering a target ahead failed (`error`): evaluate answers it in its turn",
    "gguf_gpu_failed": "llama.cpp's CUDA build could not answer on the job's GPU (`error`): the GGUF answers on the CPU",
    "heldout_evaluated": "the held-out rows' loss, perplexity and tokens for the adapter, the base and (when evaluated) "
                         "the merged model",
    "preferences_evaluated": "preference methods: the adapter's implicit rewards on the held-out and the training "
                             "examples",
    "harness_scored": "lm-evaluation-harness scored a target (base or adapter): each task's metrics and standard errors",
    "code_checks_skipped": "code checks cannot be sandboxed here and are skipped",
    "code_checks_unisolated": "code checks run without the sandbox's filter because the spec says so",
    # export and push
    "merged": "the adapter was folded into the 16-bit base (and any custom-code reference dropped); `load_s`, `fold_s`, "
              "`save_s`",
    "model_load_waited": "a model's loading waited over 0.1 s for another thread's (`what`, `seconds`): evaluate's "
                         "answers ahead and merge take turns",
    "gguf_converted": "the converter wrote the first GGUF",
    "gguf_verified": "a GGUF loaded and answered (agreement, tokenizer match)",
    "push_planned": "the push stage's plan",
    "push_dry_run": "a dry run ended",
    "repo_ready": "a Hub repo exists",
    "file_uploaded": "a file was committed to the Hub",
    "hub_retry": "a Hub call failed in a way a retry may fix; waiting (Retry-After honoured)",
    "tracking_finished": "`train.report_to`: peftopt's figures reached the trackers",
    "tracking_failed": "`train.report_to`: a tracker failed (the job does not)",
    # libraries
    "library_log": "any line from a library (transformers, trl, unsloth, Python warnings, ...), with `logger`, "
                   "`level` and `message`",
}
