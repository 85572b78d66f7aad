"""Private kernels (Triton and Gluon), one family per file, with their tuning heuristics."""
