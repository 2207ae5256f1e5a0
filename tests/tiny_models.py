"""Tiny, randomly initialised checkpoints laid out like real Hugging Face repos (BAAI/bge-m3,
Qwen/Qwen3-Embedding-0.6B), and the reference embedding recipes of their model cards computed
straight from `transformers`. Nothing is downloaded: tokenizers are trained here on a built-in corpus.

Facts about transformers 5.x that these folders rely on (checked with 5.23):
- `XLMRobertaTokenizer` rebuilds its pipeline from the Unigram vocab: WhitespaceSplit + Metaspace
  pre-tokenizer, `<s> $A </s>` post-processor, and no normalizer unless tokenizer.json holds a
  `Precompiled` one (so the NFKC normalizer written here is ignored by `AutoTokenizer`).
- `Qwen2Tokenizer` rebuilds its normalizer (NFC), pre-tokenizer (Qwen regex Split + ByteLevel) and
  decoder, but keeps tokenizer.json's post-processor; with none, it makes a `$A` template that adds
  nothing. So `eos_in_tokenizer` decides whether `AutoTokenizer` appends `<|endoftext|>`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

QWEN3_DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_QUERY_PROMPT = f"Instruct: {QWEN3_DEFAULT_TASK}\nQuery:"
QWEN3_EOS = "<|endoftext|>"

# The regex the Qwen2 tokenizer splits on (as in the real tokenizer.json and in transformers).
_QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

Embeddings = npt.NDArray[np.float32]


def qwen3_query(task: str, query: str) -> str:
    """The Qwen3-Embedding query format: `Instruct: {task}\\nQuery:{query}`."""
    return f"Instruct: {task}\nQuery:{query}"


# --------------------------------------------------------------------------------------------
# Built-in training corpus
# --------------------------------------------------------------------------------------------

_SUBJECTS = [
    "the cat",
    "a dog",
    "my neighbour",
    "the engineer",
    "our team",
    "the old man",
    "a young girl",
    "the committee",
    "every student",
    "the server",
    "this model",
    "the river",
    "a small bird",
    "the company",
    "her brother",
    "the teacher",
    "the robot",
    "a stranger",
    "the city",
    "the farmer",
]
_VERBS = [
    "reads",
    "builds",
    "watches",
    "finds",
    "carries",
    "explains",
    "paints",
    "repairs",
    "sells",
    "measures",
    "describes",
    "follows",
    "answers",
    "ignores",
    "writes",
    "retrieves",
    "embeds",
    "encodes",
    "visits",
    "remembers",
    "computes",
    "returns",
    "searches",
    "translates",
]
_OBJECTS = [
    "a long book",
    "the red car",
    "an empty bottle",
    "the quiet garden",
    "a difficult question",
    "the latest report",
    "a strange noise",
    "the mountain path",
    "an old photograph",
    "the weather",
    "a new recipe",
    "the train schedule",
    "the database",
    "a vector of numbers",
    "the documents",
    "a cup of coffee",
    "the evening news",
    "the search results",
    "a broken window",
    "the map",
]
_ADVERBS = [
    "quickly",
    "slowly",
    "carefully",
    "every morning",
    "on Sundays",
    "without a word",
    "again",
    "in the rain",
    "after lunch",
    "before midnight",
    "with great care",
    "for hours",
    "twice",
]
_QUESTIONS = [
    "what is the capital of France",
    "how do vaccines work",
    "why is the sky blue",
    "best way to learn python",
    "how many people live in Tokyo",
    "who wrote the odyssey",
    "symptoms of the common cold",
    "how to bake sourdough bread",
    "what is machine learning",
    "distance between the earth and the moon",
    "how does photosynthesis work",
    "cheap flights to Lisbon",
    "history of the roman empire",
    "how to fix a flat tyre",
]
_PASSAGES = [
    "Paris is the capital and most populous city of France.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "Rayleigh scattering makes the sky look blue during the day.",
    "Python is a popular programming language known for its readable syntax.",
    "Tokyo is one of the largest metropolitan areas in the world.",
    "The Odyssey is an ancient Greek epic poem attributed to Homer.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Roman Empire lasted for centuries and shaped European law and language.",
    "Text embeddings map sentences to vectors so that similar meanings are close together.",
    "The average distance from the Earth to the Moon is about 384,400 kilometres.",
]
_UNICODE = [
    "café",
    "naïve",
    "über",
    "Straße",
    "façade",
    "niño",
    "jalapeño",
    "São Paulo",
    "Zürich",
    "Ångström",
    "crème brûlée",
    "résumé",
    "smörgåsbord",
    "Kraków",
    "Dvořák",
    "Reykjavík",
    "Ελλάδα",
    "καλημέρα κόσμε",
    "привет мир",
    "спасибо",
    "你好世界",
    "北京",
    "こんにちは",
    "東京",
    "안녕하세요",
    "مرحبا بالعالم",
    "שלום",
    "नमस्ते",
    "สวัสดี",
    "Việt Nam",
    "İstanbul",
    "łódź",
    "€100",
    "£5",
    "¿Qué tal?",
    "¡Hola!",
    "«bonjour»",
    "naïveté",
    "coöperate",
    "emoji 🙂",
    "rocket 🚀",
    "😀😃😄",
    "👍 thanks",
    "❤️ love",
    "🎉 party",
    "🌍 world",
    "température",
    "Mädchen",
    "Ölförderung",
    "— dash – range …",
    "“quoted” ‘single’",
    "½ ° ± × ÷ → ✓",
]


_WORDS_TEXT = """
about above across action add after again against age ago agree air all almost alone along already also
always among amount animal another answer any appear apple area arm army around arrive art ask attack
autumn baby back bad ball bank base bear beat beauty become bed before begin behind believe bell best
better between big bird black blood blue board boat body bone book born both bottom box boy brain bread
break bright bring broad brother brown build burn business busy buy call camp can capital captain card
care carry case catch cause cell center century certain chair chance change charge chart check chief
child choose church circle city claim class clean clear climb clock close cloud coast cold collect
colour column common company compare complete condition connect consider contain continue control cook
cool copy corner correct cost cotton count country course cover cow create crop cross crowd cry current
cut dance dark daughter day dead deal dear death decide deep degree depend describe desert design
detail develop differ direct discuss distant divide doctor dollar door double down draw dream dress
drink drive drop dry during duty each early earth east easy eat edge effect egg eight either electric
element else end enemy energy engine enough enter equal even evening event ever every exact example
except excite exercise expect experience explain express eye face fact fair fall family famous far farm
fast father favour fear feed feel field fight figure fill final fine finger finish fire first fish fit
five flat floor flow flower fly follow food foot force forest forget form forward free fresh friend
front fruit full game garden gas gather general gentle girl give glad glass gold good govern grass
great green ground group grow guess guide hair half hand happen happy hard hat head hear heart heat
heavy help high hill history hold hole home hope horse hospital hot hour house huge human hundred
hunt hurry idea important inch include industry insect instant instrument interest invent iron island
job join joy judge jump keep kill kind king kitchen knowledge lady lake land language large last late
laugh law lay lead learn leave left length letter level library life lift light limit line liquid
listen little live long look lose loud love low machine magnet main major market mass master match
matter meat medicine meet melody memory metal method middle might mile milk million mind minute miss
modern moment money month moon morning mother motion mountain mouth move music nation nature near
neck need neighbour network never night noise north note notice number object observe ocean offer
office often open operate opinion orange order organ original oxygen page paint pair paper parent
party pass past path pattern peace people period person picture piece plain plan planet plant play
please poem point poor popular position possible pound power practice prepare present press pretty
print problem process produce product property protect proud provide public pull push quick quiet
radio rain raise range rather reach ready reason receive record region remember repeat reply report
rest result rich ride right ring rise river road rock roll room root rope rose round rule safe sail
salt sand save scale school science score search season seat second section seed select sense sentence
separate serve settle shape share sharp sheep shell shine ship shoe shop shore short shoulder shout
silver simple single sister size skill skin sleep slow small smell smile snow soft soil soldier solve
song sound south space speak special speed spell spend spring square stand star start station stay
steam steel step stick still stone stop store storm story straight strange stream street strong student
study subject success sugar suggest summer supply surprise swim symbol system table tail talk teach
team temperature test thank thick thin thought thousand three through throw thunder ticket tiny
together tomorrow tool total touch toward town track trade travel tree triangle trip trouble truck
true try tube turn twenty type uncle under unit until useful valley value various village visit voice
vowel wait walk wall warm wash watch water wave wealth weather week weight west wheel white whole wide
wife wild wind window winter wire wish woman wonder wood word work world write wrong yard year yellow
young zero
"""
_WORDS = _WORDS_TEXT.split()
_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ter",
    "an",
    "vel",
    "so",
    "ri",
    "dun",
    "pe",
    "ba",
    "zor",
    "qui",
    "ne",
    "tal",
    "ex",
    "fu",
    "gri",
    "hom",
    "ja",
    "ly",
    "mor",
    "nu",
    "ost",
    "pra",
    "sil",
    "tho",
    "ur",
    "wen",
    "yi",
]


@functools.cache
def _corpus() -> tuple[str, ...]:
    """A deterministic corpus: templated and random English sentences, search queries with the Qwen3
    instruction, passages, pseudo-words, and unicode/emoji lines."""
    rng = random.Random(20240607)
    lines: list[str] = []
    for _ in range(300):
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ADVERBS)]
        sentence = " ".join(parts)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", "...", ";"]))
    for _ in range(300):
        words = rng.sample(_WORDS, rng.randint(6, 14))
        words[rng.randrange(len(words))] += rng.choice([",", "'s", "ing", "ed", "s", "ly", "er"])
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    pseudo = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(600)]
    lines.extend(" ".join(pseudo[i : i + 8]) for i in range(0, len(pseudo), 8))
    for question in _QUESTIONS:
        lines.append(qwen3_query(QWEN3_DEFAULT_TASK, question))
        lines.append(question.capitalize() + "?")
    lines.extend(_PASSAGES)
    for _ in range(120):
        words = [*rng.sample(_UNICODE, 3), rng.choice(_OBJECTS), str(rng.randint(0, 99999))]
        rng.shuffle(words)
        lines.append(" ".join(words))
    lines.extend(_UNICODE)
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2024-06-07 12:30 50% #tag @user http://example.com")
    lines.append("( ) [ ] { } < > + - * / = _ , . ; : ! ? ' \" ` ~ ^ | \\ & $")
    return tuple(lines)


# --------------------------------------------------------------------------------------------
# Tokenizers (trained once per process; training is deterministic)
# --------------------------------------------------------------------------------------------


@functools.cache
def _bge_m3_tokenizer_json(vocab_size: int = 2000) -> str:
    """A Unigram tokenizer with XLM-R's special-token ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.NFKC()
    # What transformers' XLMRobertaTokenizer rebuilds, so tokenizer.json and AutoTokenizer agree on splits.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
        max_piece_length=16,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # The trainer's piece set is stable, but its scores are not (Rust hash-map order decides ties and
    # the order of the single characters), so the ids would change from run to run. Re-score the
    # pieces with smoothed log-frequencies over the corpus and sort them, which is deterministic.
    trained = json.loads(tok.to_str())["model"]["vocab"]
    words = [
        word
        for line in _corpus()
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line))
    ]
    text = "\n".join(words)
    pieces = sorted({piece for piece, _ in trained} - set(specials))
    counts = {piece: text.count(piece) + 1 for piece in pieces}
    total = sum(counts.values())
    scored = sorted(
        ((piece, math.log(count / total)) for piece, count in counts.items()),
        key=lambda item: (-item[1], item[0]),
    )
    tok.model = Unigram([(s, 0.0) for s in specials] + scored, unk_id=3, byte_fallback=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    ids = [tok.token_to_id(s) for s in specials]
    if ids != [0, 1, 2, 3]:
        raise RuntimeError(f"unexpected special-token ids {ids}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok.to_str()


@functools.cache
def _qwen3_tokenizer_json(eos_in_tokenizer: bool, vocab_size: int = 2000) -> str:
    """A byte-level BPE like Qwen's, special tokens after the learned vocab (as in the real one)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    # Qwen's real pipeline, which transformers' Qwen2Tokenizer rebuilds whatever tokenizer.json says.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in (QWEN3_EOS, "<|im_start|>", "<|im_end|>")]
    )
    if eos_in_tokenizer:
        eos_id = tok.token_to_id(QWEN3_EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {QWEN3_EOS}:0",
            pair=f"$A:0 {QWEN3_EOS}:0 $B:1 {QWEN3_EOS}:1",
            special_tokens=[(QWEN3_EOS, eos_id)],
        )
    return tok.to_str()


def _added_tokens_decoder(tokenizer_json: str) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`, from tokenizer.json's added tokens."""
    return {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in json.loads(tokenizer_json)["added_tokens"]
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_st_files(
    target: Path, *, dim: int, pooling: str, max_seq_length: int, prompts: dict[str, str]
) -> None:
    """modules.json (Transformer, Pooling, Normalize) and the files each module reads."""
    _write_json(
        target / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    modes = [
        "cls_token",
        "mean_tokens",
        "max_tokens",
        "mean_sqrt_len_tokens",
        "weightedmean_tokens",
        "lasttoken",
    ]
    _write_json(
        target / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": dim,
            **{f"pooling_mode_{mode}": mode == pooling for mode in modes},
            "include_prompt": True,
        },
    )
    (target / "2_Normalize").mkdir(exist_ok=True)
    _write_json(
        target / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False}
    )
    _write_json(
        target / "config_sentence_transformers.json",
        {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def build_tiny_bge_m3(
    target: Path, *, sentence_transformers_files: bool = True, heads: bool = True, seed: int = 0
) -> Path:
    """A 2-layer, 32-wide random XLMRobertaModel with a trained Unigram tokenizer, laid out like
    BAAI/bge-m3 (CLS pooling + Normalize for sentence-transformers), with `heads` its random sparse and
    ColBERT heads saved as the repo saves them (`sparse_linear.pt`: Linear(32 -> 1) and
    `colbert_linear.pt`: Linear(32 -> 32), state dicts written by torch.save)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import XLMRobertaConfig, XLMRobertaModel

    target.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _bge_m3_tokenizer_json()
    (target / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    specials = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    _write_json(
        target / "tokenizer_config.json",
        {
            "added_tokens_decoder": _added_tokens_decoder(tokenizer_json),
            **specials,
            "clean_up_tokenization_spaces": True,
            "model_max_length": 8192,
            "tokenizer_class": "XLMRobertaTokenizer",
        },
    )
    _write_json(target / "special_tokens_map.json", specials)

    config = XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=8194,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    torch.manual_seed(seed)
    model = XLMRobertaModel(config)  # fp32
    model.save_pretrained(target)
    model.config.architectures = ["XLMRobertaModel"]
    model.config.save_pretrained(target)
    if heads:
        # torch's default init (seeded above): relu keeps about half the tokens' lexical weights.
        torch.save(torch.nn.Linear(32, 1).state_dict(), target / "sparse_linear.pt")
        torch.save(torch.nn.Linear(32, 32).state_dict(), target / "colbert_linear.pt")

    if sentence_transformers_files:
        _write_st_files(target, dim=32, pooling="cls_token", max_seq_length=8192, prompts={})
    return target


def build_tiny_qwen3_embedding(
    target: Path,
    *,
    hidden_size: int = 1024,
    eos_in_tokenizer: bool = True,
    sentence_transformers_files: bool = True,
    seed: int = 0,
) -> Path:
    """A 2-layer random Qwen3Model with a trained byte-level BPE tokenizer, laid out like
    Qwen/Qwen3-Embedding-0.6B: weights saved from `Qwen3Model` (keys without a `model.` prefix, no
    lm_head) while config.json says `Qwen3ForCausalLM`, as in the real repo. `eos_in_tokenizer`
    picks the current repo (tokenizer appends `<|endoftext|>`) or the original release (it does not).
    Same seed and hidden size give the same weights and vocab for both tokenizer variants."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3Config, Qwen3Model

    target.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _qwen3_tokenizer_json(eos_in_tokenizer)
    (target / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    backend = Tokenizer.from_str(tokenizer_json)
    backend.model.save(str(target))  # vocab.json + merges.txt, as the real repo ships them
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    eos_id = backend.token_to_id(QWEN3_EOS)
    _write_json(
        target / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(tokenizer_json),
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": QWEN3_EOS,
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": QWEN3_EOS,
            "padding_side": "left",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=128,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000},
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config)  # fp32
    model.save_pretrained(target)
    model.config.architectures = ["Qwen3ForCausalLM"]
    model.config.save_pretrained(target)

    if sentence_transformers_files:
        _write_st_files(
            target,
            dim=hidden_size,
            pooling="lasttoken",
            max_seq_length=32768,
            prompts={"query": QWEN3_QUERY_PROMPT, "document": ""},
        )
    return target


def install_in_hub_cache(model: Path, hf_home: Path, repo_id: str) -> Path:
    """Copy `model` into the HF cache layout under `hf_home/hub` (snapshot + refs/main) and return the
    snapshot folder. The revision is a SHA-1 of the files, so it is stable for the same content."""
    files = sorted(p for p in model.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for path in files:
        digest.update(path.relative_to(model).as_posix().encode())
        digest.update(path.read_bytes())
    revision = digest.hexdigest()
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(model, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


# --------------------------------------------------------------------------------------------
# Reference recipes (model cards), with the loaded tokenizer/model cached per folder content
# --------------------------------------------------------------------------------------------


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Identifies a folder's content cheaply, so a rebuilt folder is reloaded."""
    out = []
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            st = path.stat()
            out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _cached_tokenizer(folder: str, stamp: tuple[tuple[str, int, int], ...], padding_side: str | None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {} if padding_side is None else {"padding_side": padding_side}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


@functools.lru_cache(maxsize=8)
def _cached_model(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> Any:
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def _tokenizer(folder: Path, padding_side: str | None = None) -> Any:
    return _cached_tokenizer(str(folder), _stamp(folder), padding_side)


def _model(folder: Path) -> Any:
    return _cached_model(str(folder), _stamp(folder))


def _embed(folder: Path, batch: Any, pool: Callable[[Any, Any], Any]) -> Embeddings:
    import torch

    with torch.inference_mode():
        hidden = _model(folder)(**batch).last_hidden_state
        vectors = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"]), p=2, dim=1)
    return np.asarray(vectors.float().numpy(), dtype=np.float32)


def _last_token_pool(last_hidden_states: Any, attention_mask: Any) -> Any:
    """The Qwen3-Embedding model card's `last_token_pool`."""
    import torch

    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def token_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    """`AutoTokenizer.from_pretrained(folder)(text)["input_ids"]` for each text (no padding)."""
    tokenizer = _tokenizer(folder)
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def bge_m3_reference(folder: Path, texts: list[str], *, max_length: int = 8192) -> Embeddings:
    """BGE-M3 dense embeddings as its model card computes them: CLS token, L2-normalised, one batch."""
    tokenizer = _tokenizer(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return _embed(folder, batch, lambda hidden, _mask: hidden[:, 0])


@dataclass(frozen=True)
class M3Outputs:
    """BGEM3FlagModel.encode's three outputs for a list of texts."""

    dense: Embeddings  # [N, H], L2-normalized CLS states
    lexical_weights: list[dict[int, float]]  # per text: token id -> its largest weight
    colbert_vecs: list[Embeddings]  # per text: [n - 1, C], L2-normalized


def bge_m3_outputs_reference(folder: Path, texts: list[str], *, max_length: int = 8192) -> M3Outputs:
    """BGE-M3's dense, sparse and ColBERT outputs as FlagEmbedding's `BGEM3FlagModel.encode` computes
    them (FlagEmbedding does not import beside transformers 5, so its recipe is written out from its
    source: `M3Embedder.encode_single_device`, `EncoderOnlyEmbedderM3ModelForInference.forward`):
    one right-padded batch; dense = normalize(hidden[:, 0]); token weights = relu(sparse_linear(hidden)),
    folded per token id by their maximum, the CLS, EOS, PAD and UNK ids and weights <= 0 dropped;
    ColBERT = normalize(colbert_linear(hidden[:, 1:]) * mask[:, 1:]), its first n - 1 rows kept."""
    import torch

    tokenizer = _tokenizer(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden_size = int(json.loads((folder / "config.json").read_text())["hidden_size"])
    sparse_linear = torch.nn.Linear(hidden_size, 1)
    sparse_linear.load_state_dict(torch.load(folder / "sparse_linear.pt", weights_only=True))
    colbert_state = torch.load(folder / "colbert_linear.pt", weights_only=True)
    colbert_linear = torch.nn.Linear(hidden_size, int(colbert_state["weight"].shape[0]))
    colbert_linear.load_state_dict(colbert_state)
    unused = {
        tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])
        for name in ("cls_token", "eos_token", "pad_token", "unk_token")
        if name in tokenizer.special_tokens_map
    }
    with torch.inference_mode():
        hidden = _model(folder)(**batch, return_dict=True).last_hidden_state  # [B, T, H]
        mask = batch["attention_mask"]
        dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
        token_weights = torch.relu(sparse_linear(hidden)).squeeze(-1)  # [B, T]
        colbert = colbert_linear(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
        colbert = torch.nn.functional.normalize(colbert, dim=-1)
    lexical: list[dict[int, float]] = []
    vectors: list[Embeddings] = []
    for row, ids in enumerate(batch["input_ids"].tolist()):
        weights: dict[int, float] = {}
        for token, weight in zip(ids, token_weights[row].tolist(), strict=True):
            if token not in unused and weight > 0 and weight > weights.get(token, 0.0):
                weights[token] = weight
        lexical.append(weights)
        real = int(mask[row].sum())
        vectors.append(np.asarray(colbert[row, : real - 1].numpy(), dtype=np.float32))
    return M3Outputs(
        dense=np.asarray(dense.numpy(), dtype=np.float32), lexical_weights=lexical, colbert_vecs=vectors
    )


def qwen3_reference(folder: Path, texts: list[str], *, max_length: int = 8192) -> Embeddings:
    """Qwen3-Embedding as its current model card computes them: left padding, the tokenizer's own
    special tokens, last-token pooling, L2-normalised, one batch."""
    tokenizer = _tokenizer(folder, "left")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return _embed(folder, batch, _last_token_pool)


def qwen3_reference_appending_eos(folder: Path, texts: list[str], *, max_length: int = 8192) -> Embeddings:
    """Qwen3-Embedding as the original model card computes them: truncate to `max_length - 2`, append
    `<|endoftext|>` by hand, pad left, last-token pooling, L2-normalised, one batch."""
    tokenizer = _tokenizer(folder, "left")
    eod_id = tokenizer.convert_tokens_to_ids(QWEN3_EOS)
    batch = tokenizer(texts, padding=False, truncation=True, max_length=max_length - 2)
    for seq, att in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        seq.append(eod_id)
        att.append(1)
    batch = tokenizer.pad(batch, padding=True, return_tensors="pt")
    return _embed(folder, batch, _last_token_pool)


def training_corpus() -> tuple[str, ...]:
    """The built-in corpus the tokenizers here are trained on."""
    return _corpus()
