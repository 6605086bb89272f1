"""The run wing: what turns a Hydra config into stages, files and a summary. The library never imports it.

- :mod:`~kd_lightning.run.cli`: ``python -m kd_lightning`` (and its ``export`` subcommand);
- :mod:`~kd_lightning.run.train`: ``train(cfg)``, the recipe of a run;
- :mod:`~kd_lightning.run.settings`: the config read once into typed settings (the only reader of the config);
- :mod:`~kd_lightning.run.config`: Hydra's schemas, the model group, building objects from config nodes;
- :mod:`~kd_lightning.run.teachers`: where a run's teacher comes from (a checkpoint, trained once, recorded) and the
  checks that need built models;
- :mod:`~kd_lightning.run.stages`: one stage (teacher, distilled, baseline) fitted and tested;
- :mod:`~kd_lightning.run.run_dir`: the run directory's rules (resume, overwrite, a refused run writes nothing);
- :mod:`~kd_lightning.run.export`, :mod:`~kd_lightning.run.report`, :mod:`~kd_lightning.run.plots`,
  :mod:`~kd_lightning.run.memory_plan`: the student out, a sweep's table, curves, each device's bytes.
"""

__all__: list[str] = []
