"""Input data: LLaVA JSONL (or TFDS ArrayRecord) -> Grain pipeline -> numpy batches.

  tokenizer.py     a digit-splitting byte-level BPE in Hugging Face format
  conversation.py  chat template rendering and the assistant-only loss mask
  images.py        image decoding and CLIP-style preprocessing
  jsonl.py         LLaVA JSONL records with safe image paths
  examples.py      one record -> one fixed-size example
  pipeline.py      validation, bad-record policy, Grain iterator, eval batches
  digits.py        the embedded scikit-learn digits dataset
  tfds_source.py   TFDS ArrayRecord storage without TensorFlow

Nothing here imports model code; batches are host-local numpy arrays.
"""
