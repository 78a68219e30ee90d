"""Data: the scene VQA dataset on disk (TFDS, array_record) and Grain loaders.

  scene_tfds  builds the splits of `auditdm_jax.scenes.examples` into a TFDS
              data_dir without TensorFlow and reads them back as random-access
              sources (`build`, `data_source`).
  pipeline    Grain loaders over any random-access source: a sharded, shuffled,
              checkpointable training loader (`train_loader`, `save_args`,
              `restore_args`; per-process rows of global batches with
              shard_mode="batch_rows") and deterministic padded eval batches
              (`eval_batches`).
  exemplars_tfds  the mined-exemplar store (journal + TFDS publication).
  named       the real configs' datasets: TFDS builds or big_vision-style
              jsonl, local or gs:// (`open_source`, `problems`).
"""
