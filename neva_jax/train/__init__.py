"""Training: stage freezing, the pure sharded step, the loop, Orbax checkpoints, metrics.

    from neva_jax.train import loop, checkpoint
    loop.train(run_config, workdir)          # what `python -m neva_jax.main` runs
    loop.evaluate(run_config, workdir)       # `--mode eval`
    model, info = checkpoint.restore_model_from_workdir(path, mesh=None)

Modules: `optimizer` (freezing as data, AdamW + schedule), `state` (TrainState),
`step` (the pure jitted step), `build` (mesh, initial/restored state), `loop`,
`checkpoint`, `metrics`.
"""
