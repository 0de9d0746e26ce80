"""kdrun's Optuna sweeper as a Hydra plugin (``hydra/sweeper=kdrun_optuna``); its logic is ``kdrun.cli.search``."""
