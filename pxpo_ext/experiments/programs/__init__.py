"""The experiments' programs: ``python/experiment_<name>.py`` calls ``main`` of the module of the same name."""
