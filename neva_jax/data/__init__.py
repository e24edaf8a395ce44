"""Data: LLaVA-format records -> token ids, loss masks, image slots -> grain batches.

Entry points (see each module's docstring):
  config.DataConfig                      every data knob (typed, frozen)
  pipeline.make_train_iterator(cfg, process_index=, process_count=)
  pipeline.make_eval_iterator(cfg, process_index=, process_count=)
  tokenize.load_tokenizer(path, ...)     AutoTokenizer + <image> (+ template tokens)
  conversation.get_template(name).render(messages) -> spans
  tokenize.encode_spans(spans, tok, num_image_slots) -> ids / trained / image masks
  batching.BatchIterator                 pads or packs prepared samples into batches
  grouping                               `group_by_modality_length` (LLaVA-1.5 stage 2)
  image.open_image / image.preprocess    CLIPImageProcessor-identical pixels
  synth.generate(out, seed=...)          the bundled synthetic dataset
CLI: `python -m neva_jax.data synth|inspect|validate` (see __main__.py).
"""
