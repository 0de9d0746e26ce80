"""The command-line entry points (kdrun, kdrun-eval, kdrun-summary) and the Hydra sweep callback."""
