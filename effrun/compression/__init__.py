"""Compression methods: one file per method, one YAML per method under configs/compression/.

The contract (see effrun/context.py):

    @dataclass
    class MyMethod:                      # the config dataclass is also the YAML's schema
        amount: float = 0.5
        def __call__(self, model: nn.Module, ctx: StageContext) -> nn.Module: ...

and configs/compression/<stage>/<name>.yaml with
`_target_: effrun.compression.<stage>.<file>.MyMethod`
plus the fields. The pipeline loads the parent stage's model, calls the method, evaluates the
result when the method did not put "accuracy" in ctx.metrics, and saves the artifact — through
`method.save(model, stage_dir, ctx) -> Path` when the method defines one, else as a state_dict
with `ctx.model_config` (set it when the method changes the architecture family).
"""
