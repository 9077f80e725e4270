"""dmtune's Optuna sweeper for Hydra: ``hydra/sweeper=optuna`` (needs
``pip install dmtune[optuna]``)."""
