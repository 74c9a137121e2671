"""Recipes: one module per config, each with ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict``; load them by name (``ldm-jax train --config sd_v1_train``, see
:func:`ldm_jax.config_utils.load_config`) and override any field from the command line
(``--config.train.lr=1e-4``). :mod:`.common` holds the defaults the recipes share."""
