"""Data: Grain loaders, the exemplar store and the real configs' datasets.

The scene world's dataset builder lives with the world (`scenes/tfds.py`).

  loaders     Grain loaders over any random-access source: a sharded, shuffled,
              checkpointable training loader (`train_loader`, `save_args`,
              `restore_args`; per-process rows of global batches with
              shard_mode="batch_rows") and deterministic padded eval batches
              (`eval_batches`).
  exemplars_tfds  the mined-exemplar store (journal + TFDS publication).
  named       the real configs' datasets: TFDS builds or big_vision-style
              jsonl, local or gs:// (`open_source`, `problems`).
"""
