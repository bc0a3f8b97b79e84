"""The text vocabulary and the token ids the model relies on.

Ids (both vocabularies seqio offers here keep them):
  PAD_ID = 0  padding in every text feature;
  EOS_ID = 1  ends every target (the feature converter appends it after the answer);
  BOS_ID = 0  the decoder's first input. As in t5x's decoder-only models, `text_inputs` is
              `text_targets` shifted right by one with 0 filling the first slot, so BOS needs no
              id of its own and no vocabulary has to reserve one.
"""

from __future__ import annotations

import ml_collections
import seqio
from etils import epath

from mirasol3b import errors

PAD_ID = 0
EOS_ID = 1
BOS_ID = PAD_ID


def get_vocabulary(config: ml_collections.ConfigDict) -> seqio.Vocabulary:
    """`seqio.ByteVocabulary()` unless `config.data.vocab_path` names a SentencePiece model.

    Checks that the model's embedding table can hold every id of the vocabulary.
    """
    path = config.data.vocab_path
    if path:
        if not epath.Path(path).exists():  # epath: a gs:// path too (seqio reads it with tf.io.gfile)
            raise errors.NotFoundError(f"config.data.vocab_path: no SentencePiece model at {path!r}; set it to an "
                                    "existing .model file, or to '' for the byte vocabulary")
        vocab = seqio.SentencePieceVocabulary(path)
    else:
        vocab = seqio.ByteVocabulary()
    check_vocabulary(vocab, config.model.vocab_size)
    return vocab


def check_vocabulary(vocab: seqio.Vocabulary, model_vocab_size: int) -> None:
    """Raises if the model's vocab is too small for `vocab`, or if pad/eos differ from 0/1."""
    if model_vocab_size < vocab.vocab_size:
        raise ValueError(f"config.model.vocab_size ({model_vocab_size}) is smaller than the vocabulary's "
                         f"{vocab.vocab_size} ids ({type(vocab).__name__}); set config.model.vocab_size >= "
                         f"{vocab.vocab_size} (a multiple of 128 is faster on TPU)")
    if (vocab.pad_id, vocab.eos_id) != (PAD_ID, EOS_ID):
        raise ValueError(f"{type(vocab).__name__} has pad_id={vocab.pad_id}, eos_id={vocab.eos_id}; the model and "
                         f"decoding assume pad={PAD_ID}, eos={EOS_ID} (train the SentencePiece model with "
                         "--pad_id=0 --eos_id=1, as T5's are)")
