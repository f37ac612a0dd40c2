"""Data: webdataset shards of centre-cropped images (plus optional cached latents and features).

  repa.data.synthetic  class-conditional synthetic images (ImageNet folder layout) for demos/tests
  repa.data.build      image folder / labelled folder / tar shards -> shards + manifest.json
  repa.data.shards     the shard format: member names, URL expansion and opening, tar reading
  repa.data.stream     make_train_stream (per-rank, resumable) and iter_eval_batches (in order)
  repa.data.verify     verify_shards and inspect_shards

Nothing is imported here, so `import repa.data.build` does not pay for torch.
"""
