"""Input data: LLaVA JSONL (or TFDS ArrayRecord) -> Grain pipeline -> numpy batches.

  tokenizer.py     a digit-splitting byte-level BPE in Hugging Face format
  conversation.py  chat template rendering and the assistant-only loss mask
  images.py        image decoding and CLIP-style preprocessing
  jsonl.py         LLaVA JSONL records with safe image paths
  examples.py      one record -> one fixed-size example
  pipeline.py      validation, bad-record policy, Grain iterator, mixtures, eval batches
  sources.py       what `config.data.train_files` names: JSONL files, converted datasets
  convert.py       JSONL + images -> ArrayRecord, once (`python -m openvlm_jax.data.convert`)
  tfds_source.py   TFDS ArrayRecord storage without TensorFlow
  digits.py        the embedded scikit-learn digits dataset
  charts.py        the chart benchmark from real tables

Nothing here imports model code; batches are host-local numpy arrays.
"""
