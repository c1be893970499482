"""microdit tests. A regular package, so that `tests.helpers` resolves here even where another
installed distribution (torch-fidelity 0.4) ships a top-level `tests` package."""
