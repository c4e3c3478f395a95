"""`python -m job ...` is the same as the `peftopt` console script."""
from job.cli import main

if __name__ == "__main__":
    main()
