"""CLIP and T5 tokenizers trained offline with the `tokenizers` library on a given corpus and
wrapped in the transformers classes real Flux checkpoints name, so they save and load exactly like
the real ones. Used by the embedded model's trainer and by the tests' tiny checkpoints."""

from __future__ import annotations

import json


def clip_tokenizer(corpus: list[str], vocab_size: int = 600):
    """A byte-level BPE with CLIP's pre-tokenization and `</w>` suffix, as `CLIPTokenizer`."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(BPE(end_of_word_suffix="</w>", unk_token=eos))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def t5_tokenizer(corpus: list[str], vocab_size: int = 300, model_max_length: int = 512):
    """A Unigram model with T5's special-token layout (<pad>=0, </s>=1, <unk>=2), as `T5TokenizerFast`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_word_tokenizer(words: list[str], model_max_length: int = 512):
    """A Unigram T5 tokenizer whose pieces are the given words (and every single character, so
    any text still tokenizes), as `T5TokenizerFast`. For a closed vocabulary such as the embedded
    model's caption grammar, where training a Unigram model on the few distinct words keeps only
    characters (a caption then outruns a short T5 context)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    chars = sorted({c for w in words for c in w} | {"▁"})
    # Viterbi picks the highest total log-probability: one word piece (-1) beats its letters (-10 each).
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(words))] + [(c, -10.0) for c in chars]
    tok = Tokenizer(Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
