"""Not lessons: the measurements and figures of each lesson (its companion, which imports the lesson),
the evaluation metric, the gallery, run comparison and the benchmark. Run them from the repository root
as modules, e.g. `python -m tools.ddpm_figures --sample-only --eval 2000`."""
