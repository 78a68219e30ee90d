"""What the stages share, so that no stage imports another: the workdir layout
and model names (`layout`), the rounds of audit -> mine -> rectify
(`rounds`), the config sections' translation to `TrainConfig` (`recipes`),
the stage declarations (`spec`) and the answerer evaluation cache
(`evaluation`)."""
