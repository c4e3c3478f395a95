"""Evaluation: prompt suites, generation done the same way for every target, and answer checks."""
