"""Training: stage freezing, the pure sharded step, the loop, Orbax checkpoints, metrics.

    from neva_jax.train import loop
    loop.train(run_config, workdir)          # what `python -m neva_jax.main` runs
    loop.evaluate(run_config, workdir)       # `--mode eval`
    # reading a run back into a model: neva_jax.convert.checkpoint.load_model(workdir)

Modules: `optimizer` (AdamW + schedule; freezing is `model.parts`), `state`
(TrainState), `step` (the pure jitted step), `build` (mesh, initial state), `loop`,
`checkpointer` (writing and resuming Orbax checkpoints), `metrics`, `plan`.
"""
