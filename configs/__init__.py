"""Named starting configs: `configs/NAME.py` defines `get_config() -> sr_jax.config.Config`."""
