"""Encoding: each family's exact training format, exact label masks, image token counts that the
tiny models of the zoo accept, skips, truncation and collation."""

from __future__ import annotations

import functools
import string

import numpy as np
import pytest
import torch
import zoo
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

from tive.data.schemas import Record, Turn
from tive.errors import ConfigError
from tive.models.bunny import BUNNY
from tive.models.encoding import collate, make_encoder
from tive.models.llava import LLAVA
from tive.models.segments import IGNORE, Encoded, Skipped

QWEN_SYSTEM = "You are a helpful assistant."
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [LLAVA.system, BUNNY.system, QWEN_SYSTEM, string.ascii_letters + string.digits,
          "USER: What is in the image? ASSISTANT: A red square on a white background.\n",
          "Which colour is it? It is red, green or blue; (maybe) none - who knows!"] * 4


def _tokenizer(head: list[str], tail: list[str], **kw: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE: ``head`` special tokens at ids 0.., ``tail`` at the last ids below 128."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    size = zoo.VOCAB - len(tail)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, special_tokens=head,
                                                       show_progress=False))
    tk.add_tokens([f"<unused{i}>" for i in range(size - tk.get_vocab_size())])
    tk.add_special_tokens(tail)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    assert len(tok) == zoo.VOCAB
    assert [tok.convert_tokens_to_ids(t) for t in tail] == list(range(size, zoo.VOCAB))
    return tok


@functools.cache
def llava_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(["<unk>", "<s>", "</s>"], ["<image>"], unk_token="<unk>", bos_token="<s>",
                      eos_token="</s>", pad_token="<unk>")


@functools.cache
def bunny_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(["<|endoftext|>"], ["<image>"], eos_token="<|endoftext|>",
                      pad_token="<|endoftext|>")


@functools.cache
def qwen_tok() -> PreTrainedTokenizerFast:
    return _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      ["<|vision_end|>", "<|vision_start|>", "<|video_pad|>", "<|image_pad|>"],
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


@functools.cache
def chat_tok() -> PreTrainedTokenizerFast:
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [],
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def _bunny_pixels(images: list[Image.Image]) -> torch.Tensor:
    """Stand-in for Bunny's preprocessing: a callable returning ``(images, 3, 28, 28)``."""
    arrays = [np.asarray(im.convert("RGB").resize((28, 28)), dtype=np.float32) / 255
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def encoder(family: str, **kw):
    if family == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 28},
                                   crop_size={"height": 28, "width": 28})
        return make_encoder("llava", llava_tok(), image_processor=ip, image_tokens=4, **kw)
    if family == "bunny":
        return make_encoder("bunny", bunny_tok(), image_processor=_bunny_pixels, image_tokens=4,
                            **kw)
    if family == "qwen2-vl":
        ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
        return make_encoder("qwen2-vl", qwen_tok(), image_processor=ip, **kw)
    return make_encoder("causal-lm", chat_tok(), **kw)


TOKENIZERS = {"llava": llava_tok, "bunny": bunny_tok, "qwen2-vl": qwen_tok, "causal-lm": chat_tok}
END = {"llava": "</s>", "bunny": "<|endoftext|>", "qwen2-vl": "<|im_end|>",
       "causal-lm": "<|im_end|>\n"}
LEAD = {"llava": " ", "bunny": " ", "qwen2-vl": "", "causal-lm": ""}  # answer's leading space


def record(*turns: tuple[str, str], images: int = 0, index: int = 3) -> Record:
    return Record(index, f"r{index}", tuple(Turn(*t) for t in turns),
                  tuple(f"img{i}.png" for i in range(images)), None)


def picture(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text(family: str, ids: list[int]) -> str:
    return TOKENIZERS[family]().decode(ids)


def supervised_runs(family: str, enc: Encoded) -> list[str]:
    """Decoded runs of consecutive supervised tokens; checks labels equal ids where supervised."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        assert label in (IGNORE, token)
        if label == IGNORE and current:
            runs.append(current)
            current = []
        elif label != IGNORE:
            current.append(token)
    return [text(family, r) for r in runs + ([current] if current else [])]


ONE = (("user", "<image>\nWhat is in the image?"), ("assistant", "A red square."))
TWO = ONE + (("user", "Which colour is it?"), ("assistant", "It is red."))
TEXT = (("user", "Who knows?"), ("assistant", "Maybe none."))


# --------------------------------------------------------------------------------------------
# exact formats


def test_llava_single_turn_is_vicuna_v1_with_bos_and_image_tokens():
    enc = encoder("llava").encode(record(*ONE, images=1), [picture()])
    assert text("llava", enc.input_ids) == (
        f"<s>{LLAVA.system} USER: {'<image>' * 4}\nWhat is in the image? ASSISTANT: "
        f"A red square.</s>")
    assert enc.input_ids[0] == llava_tok().bos_token_id and enc.input_ids.count(127) == 4
    assert supervised_runs("llava", enc) == [" A red square.</s>"]
    assert enc.images == 1 and tuple(enc.pixel_values.shape) == (1, 3, 28, 28)
    assert enc.extras == {} and enc.mm_token_type_ids is None


def test_llava_multi_turn_separators_follow_the_conversation_template():
    enc = encoder("llava").encode(record(*TWO, images=1), [picture()])
    assert text("llava", enc.input_ids) == (
        f"<s>{LLAVA.system} USER: {'<image>' * 4}\nWhat is in the image? ASSISTANT: "
        f"A red square.</s>USER: Which colour is it? ASSISTANT: It is red.</s>")
    assert supervised_runs("llava", enc) == [" A red square.</s>", " It is red.</s>"]


def test_llava_moves_the_placeholder_to_the_start_of_its_turn():
    turns = (("user", "What is in the image?\n<image>"), ("assistant", "A red square."))
    enc = encoder("llava").encode(record(*turns, images=1), [picture()])
    expected = f"USER: {'<image>' * 4}\nWhat is in the image? ASSISTANT:"
    assert expected in text("llava", enc.input_ids)


def test_bunny_has_no_bos_and_ends_answers_with_endoftext():
    enc = encoder("bunny").encode(record(*TWO, images=1), [picture()])
    assert text("bunny", enc.input_ids) == (
        f"{BUNNY.system} USER: {'<image>' * 4}\nWhat is in the image? ASSISTANT: "
        f"A red square.<|endoftext|>USER: Which colour is it? ASSISTANT: It is red.<|endoftext|>")
    assert supervised_runs("bunny", enc) == [" A red square.<|endoftext|>",
                                             " It is red.<|endoftext|>"]
    assert tuple(enc.pixel_values.shape) == (1, 3, 28, 28)


def test_qwen2vl_is_chatml_with_grid_derived_image_tokens():
    enc = encoder("qwen2-vl").encode(record(*TWO, images=1), [picture(100, 70)])
    grid = enc.extras["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8]] and tuple(enc.pixel_values.shape) == (32, 1176)
    pads = "<|image_pad|>" * 8  # 1·4·8 patches / merge 2²
    assert text("qwen2-vl", enc.input_ids) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>{pads}"
        f"<|vision_end|>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
        f"A red square.<|im_end|>\n<|im_start|>user\nWhich colour is it?<|im_end|>\n"
        f"<|im_start|>assistant\nIt is red.<|im_end|>\n")
    assert supervised_runs("qwen2-vl", enc) == ["A red square.<|im_end|>", "It is red.<|im_end|>"]
    assert enc.mm_token_type_ids == [int(t == 127) for t in enc.input_ids]
    assert enc.labels[-1] == IGNORE and text("qwen2-vl", enc.input_ids[-1:]) == "\n"


def test_qwen2vl_places_images_at_placeholders_or_before_the_text():
    images = [picture(100, 70), picture(30, 30, seed=1)]  # 8 and 4 tokens
    turns = (("user", "Compare <image> with <image>."), ("assistant", "Same."))
    enc = encoder("qwen2-vl").encode(record(*turns, images=2), images)
    block = lambda n: f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>"
    assert f"user\nCompare {block(8)} with {block(4)}.<|im_end|>" in text("qwen2-vl", enc.input_ids)
    assert enc.extras["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]
    bare = (("user", "Compare them."), ("assistant", "Same."))
    enc = encoder("qwen2-vl").encode(record(*bare, images=2), images)
    assert f"user\n{block(8)}{block(4)}Compare them.<|im_end|>" in text("qwen2-vl", enc.input_ids)


def test_causal_lm_uses_the_chat_template_incrementally():
    enc = encoder("causal-lm").encode(record(*TEXT, ("user", "Why?"), ("assistant", "No idea.")),
                                      [])
    assert text("causal-lm", enc.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho knows?<|im_end|>\n"
        "<|im_start|>assistant\nMaybe none.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\nNo idea.<|im_end|>\n")
    assert supervised_runs("causal-lm", enc) == ["Maybe none.<|im_end|>\n", "No idea.<|im_end|>\n"]
    assert enc.images == 0 and enc.pixel_values is None


def test_causal_lm_refuses_a_template_whose_earlier_turns_change():
    tok = _tokenizer(["<|endoftext|>"], [], eos_token="<|endoftext|>")
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}:{% endif %}")
    with pytest.raises(ConfigError, match="not incremental"):
        make_encoder("causal-lm", tok).encode(record(*TEXT), [])


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "causal-lm"])
def test_answers_alone_are_supervised_single_and_multi_turn(family):
    three = TEXT + (("user", "Why?"), ("assistant", "No idea.")) + (("user", "Ok?"),
                                                                   ("assistant", "Ok."))
    for turns, answers in [(TEXT, ["Maybe none."]), (three, ["Maybe none.", "No idea.", "Ok."])]:
        enc = encoder(family).encode(record(*turns), [])
        assert supervised_runs(family, enc) == [LEAD[family] + a + END[family] for a in answers]
        assert enc.pixel_values is None and enc.images == 0


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "causal-lm"])
def test_a_system_turn_replaces_the_default_system_prompt(family):
    enc = encoder(family).encode(record(("system", "Answer in one word."), *TEXT), [])
    decoded = text(family, enc.input_ids)
    assert "Answer in one word." in decoded
    assert not any(s in decoded for s in (LLAVA.system, BUNNY.system, QWEN_SYSTEM, "Be brief."))
    assert supervised_runs(family, enc) == [LEAD[family] + "Maybe none." + END[family]]


def test_leading_assistant_turns_are_dropped():
    enc = encoder("llava").encode(record(("assistant", "Hi."), *TEXT), [])
    assert supervised_runs("llava", enc) == [" Maybe none.</s>"]
    assert "Hi." not in text("llava", enc.input_ids)


# --------------------------------------------------------------------------------------------
# skips and truncation


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "causal-lm"])
def test_records_without_an_answer_are_skipped(family):
    assert encoder(family).encode(record(("user", "Who knows?"), index=7), []) == \
        Skipped(7, "r7", "no-supervised-token")


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl"])
def test_placeholders_must_match_the_images_given(family):
    enc = encoder(family)
    assert enc.encode(record(*ONE), []).reason == "image-count-mismatch"
    two = (("user", "<image> and <image>?"), ("assistant", "Yes."))
    assert enc.encode(record(*two, images=1), [picture()]).reason == "image-count-mismatch"
    inside = (("user", "Hi?"), ("assistant", "<image>"))
    assert enc.encode(record(*inside, images=1), [picture()]).reason == "image-outside-user-turn"


@pytest.mark.parametrize("family", ["llava", "bunny"])
def test_an_image_without_placeholder_is_ignored_as_its_trainer_does(family):
    """LLaVA's and Bunny's trainers splice images only at ``<image>``: with none in the text
    the record trains as text (Bunny's ``bunny_arch.py`` concatenates zero image rows)."""
    enc = encoder(family).encode(record(*TEXT, images=1), [picture()])
    plain = encoder(family).encode(record(*TEXT), [])
    assert enc.input_ids == plain.input_ids and enc.labels == plain.labels
    assert enc.images == 0 and enc.pixel_values is None
    assert "<image>" not in text(family, enc.input_ids)


def test_images_in_a_text_model_are_skipped():
    assert encoder("causal-lm").encode(record(*ONE, images=1), [picture()]) == \
        Skipped(3, "r3", "image-in-text-model")


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "causal-lm"])
def test_truncation_keeps_the_beginning(family):
    full = encoder(family).encode(record(*TWO[2:] + TEXT), [])
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    cut = encoder(family, max_length=first_label + 2).encode(record(*TWO[2:] + TEXT), [])
    assert cut.input_ids == full.input_ids[:first_label + 2]
    assert cut.labels == full.labels[:first_label + 2] and cut.labels[-1] != IGNORE
    short = encoder(family, max_length=first_label).encode(record(*TWO[2:] + TEXT), [])
    assert short.reason == "no-supervised-token"


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_truncation_never_cuts_an_image(family):
    full = encoder(family).encode(record(*ONE, images=1), [picture()])
    image = [i for i, t in enumerate(full.input_ids) if t == 127]
    inside = encoder(family, max_length=image[-1]).encode(record(*ONE, images=1), [picture()])
    assert inside.reason == "too-long-for-image"
    after = encoder(family, max_length=image[-1] + 1).encode(record(*ONE, images=1), [picture()])
    assert after.reason == "no-supervised-token"


# --------------------------------------------------------------------------------------------
# collation and the models


def test_collate_pads_either_side_with_ignored_labels_and_zero_attention():
    a = Encoded([5, 6, 7], [IGNORE, 6, 7], 1, torch.ones(1, 3, 2, 2),
                {"image_grid_thw": torch.tensor([[1, 2, 2]])}, [0, 1, 0])
    b = Encoded([8], [8], 0, None)
    right = collate([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert right["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    left = collate([a, b], pad_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]
    assert left["pixel_values"].shape == (1, 3, 2, 2)
    assert left["image_grid_thw"].tolist() == [[1, 2, 2]]
    texts = collate([b, b], pad_id=0)
    assert set(texts) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert texts["pixel_values"] is None
    with pytest.raises(ConfigError, match="padding_side"):
        collate([a], pad_id=0, padding_side="middle")


MODELS = {"llava": zoo.llava_clip_llama, "bunny": zoo.llava_siglip_phi, "qwen2-vl": zoo.qwen2_vl,
          "causal-lm": zoo.text_llama}


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_run_through_the_zoo_models_with_labels(family, side):
    enc = encoder(family)
    two = (("user", "Compare <image> with <image>."), ("assistant", "Same."))
    items = [enc.encode(record(*ONE, images=1), [picture(100, 70)]),
             enc.encode(record(*TEXT), []),
             enc.encode(record(*two, images=2), [picture(seed=1), picture(30, 30, seed=2)])]
    assert all(isinstance(item, Encoded) for item in items)
    batch = collate(items, pad_id=TOKENIZERS[family]().pad_token_id, padding_side=side)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert len(batch["pixel_values"]) == (3 if family != "qwen2-vl" else
                                          int(batch["image_grid_thw"].prod(-1).sum()))
    with torch.no_grad():
        out = MODELS[family]()(**batch)
    assert torch.isfinite(out.loss)


def test_causal_lm_batch_runs_through_a_text_model():
    items = [encoder("causal-lm").encode(record(*TEXT), []),
             encoder("causal-lm").encode(record(("user", "Why?"), ("assistant", "No.")), [])]
    batch = collate(items, pad_id=chat_tok().pad_token_id)
    assert batch.pop("pixel_values") is None
    with torch.no_grad():
        assert torch.isfinite(zoo.text_llama()(**batch).loss)


def test_make_encoder_refuses_bad_settings():
    with pytest.raises(ConfigError, match="unknown model family 'gpt'"):
        make_encoder("gpt", llava_tok())
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        make_encoder("llava", llava_tok(), image_processor=_bunny_pixels, image_tokens=4,
                     colour="red")
    with pytest.raises(ConfigError, match="image_tokens=None"):
        make_encoder("llava", llava_tok(), image_processor=_bunny_pixels)
    with pytest.raises(ConfigError, match="no image_processor"):
        make_encoder("qwen2-vl", qwen_tok())
    with pytest.raises(ConfigError, match="no '<image>' token"):
        make_encoder("bunny", chat_tok(), image_processor=_bunny_pixels, image_tokens=4)
    with pytest.raises(ConfigError, match="no chat template"):
        make_encoder("causal-lm", llava_tok())
    custom = make_encoder("bunny", chat_tok(), image_processor=_bunny_pixels, image_tokens=2,
                          image_token_id=5)
    enc = custom.encode(record(*ONE, images=1), [picture()])
    assert enc.input_ids.count(5) == 2


def test_a_bug_in_an_encoder_raises_while_a_refused_image_is_a_skip(tmp_path):
    import json

    from tive.data.mixture import load_mixture
    from tive.models.encoding import encode_row
    from tive.models.segments import UnusableImage

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "mix.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]))
    mixture = load_mixture(tmp_path / "mix.json")

    class Buggy:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def encode(self, record, images):
            raise self.error

    with pytest.raises(KeyError):
        encode_row(Buggy(KeyError("a bug")), mixture, 0)
    with pytest.raises(ValueError):
        encode_row(Buggy(ValueError("a bug too")), mixture, 0)
    assert encode_row(Buggy(UnusableImage("refused")), mixture, 0) == "error"
