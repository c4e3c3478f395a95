"""One module per stage, each with a plain `run(spec, run_dir, ctx)` that returns the artifacts it wrote."""
