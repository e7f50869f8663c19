"""Loading HF folders: sharded files, mmap without copies, strict name checks, clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmarun
from gemmarun.loading import LoadError
from gemmarun.loading.safetensors import read_safetensors


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_sharded_index_loads_identically(tiny_models, tmp_path):
    folder, _ = tiny_models("e4b")
    dst = _copy(folder, tmp_path)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        save_file({n: tensors[n] for n in part}, dst / shard)
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = [2, 30, 40, 50, 60]
    a = gemmarun.load(folder, device="cpu").logits(ids)
    b = gemmarun.load(dst, device="cpu").logits(ids)
    np.testing.assert_array_equal(a, b)


def _mapped_file(ptr: int) -> str | None:
    """The file a memory address is mapped from (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux")
def test_float32_weights_are_views_of_the_file_and_ple_stays_mapped(tiny_models):
    folder, _ = tiny_models("e2b")
    llm = gemmarun.load(folder, dtype="float32", device="cpu")
    path = str((folder / "model.safetensors").resolve())
    # the PLE table is not a parameter or buffer (never moved to a device) and reads the file
    assert not any("ple.table" in n for n, _ in llm.model.named_parameters())
    assert _mapped_file(llm.model.ple.table.data_ptr()) == path
    # a float32 checkpoint loaded as float32 is not copied: weights are views of the mapping
    w = llm.model.layers[0].self_attn.q_proj.weight
    assert _mapped_file(w.data_ptr()) == path
    # vectors are read into memory: touching them in the mapping maps the large folio around them
    assert _mapped_file(llm.model.layers[0].input_layernorm.weight.data_ptr()) != path
    assert torch.equal(w, read_safetensors(folder / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])
    # a dtype conversion makes the one resident copy
    bf = gemmarun.load(folder, dtype="bfloat16", device="cpu")
    assert _mapped_file(bf.model.layers[0].self_attn.q_proj.weight.data_ptr()) != path
    assert _mapped_file(bf.model.ple.table.data_ptr()) == path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(tiny_models, dtype):
    folder, _ = tiny_models("31b")
    ref = gemmarun.load(folder, dtype="float32", device="cpu").logits([2, 11, 12, 13, 14, 15])
    low = gemmarun.load(folder, dtype=dtype, device="cpu").logits([2, 11, 12, 13, 14, 15])
    assert np.abs(low - ref).max() / np.abs(ref).max() < 5e-2


def _edit_tensors(folder, tmp_path, edit):
    dst = _copy(folder, tmp_path)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_and_misshapen_tensors_are_listed(tiny_models, tmp_path):
    folder, _ = tiny_models("e2b")

    def edit(t):
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)

    dst = _edit_tensors(folder, tmp_path, edit)
    with pytest.raises(LoadError) as e:
        gemmarun.load(dst, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing tensors: layers.0.mlp.up_proj.weight" in msg
    assert "wrong shapes: layers.1.self_attn.q_proj.weight (3, 3)" in msg


def test_unknown_extra_tensor_is_an_error_but_shared_kv_is_ignored(tiny_models, tmp_path):
    folder, _ = tiny_models("e2b")
    dst = _edit_tensors(folder, tmp_path, lambda t: t.update({
        "model.layers.9.self_attn.k_proj.weight": torch.zeros(16, 64),  # shared layer: ignored
    }))
    gemmarun.load(dst, device="cpu")
    dst2 = _edit_tensors(folder, tmp_path / "b", lambda t: t.update({"model.layers.0.bogus.weight": torch.zeros(2)}))
    with pytest.raises(LoadError, match="unexpected tensors: layers.0.bogus.weight"):
        gemmarun.load(dst2, device="cpu")
    # keys of a layer the config does not have (a config that does not fit the weights)
    dst3 = _edit_tensors(folder, tmp_path / "c", lambda t: t.update({
        "model.layers.99.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(LoadError, match="unexpected tensors: layers.99.self_attn.k_proj.weight"):
        gemmarun.load(dst3, device="cpu")


def test_truncated_and_corrupt_files(tiny_models, tmp_path):
    folder, _ = tiny_models("e2b")
    dst = _copy(folder, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="does not fit the file"):
        gemmarun.load(dst, device="cpu")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(LoadError, match="corrupt safetensors header"):
        gemmarun.load(dst, device="cpu")
    (dst / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(LoadError, match="header length"):
        gemmarun.load(dst, device="cpu")
    (dst / "config.json").write_text("{")
    with pytest.raises(gemmarun.ConfigError, match="not valid JSON"):
        gemmarun.load(dst, device="cpu")


# Header entries that were tracebacks (or a 2**66-byte allocation) before they became one-line
# LoadErrors; minimised from what fuzz/safetensors_header.py found.
HOSTILE_HEADERS = {
    "one data offset": ({"dtype": "F32", "shape": [1], "data_offsets": [4]}, "data_offsets"),
    "entry is not an object": (5, "no header object"),
    "dtype is a list": ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype"),
    "shape of strings": ({"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}, "not a list of non-negative"),
    "negative dims": ({"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}, "not a list of non-negative"),
    "dims whose product wraps int64 to 0": (
        {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "too large"),
    "empty tensor with a dim past int64": (
        {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}, "too large"),
}


@pytest.mark.parametrize("label", sorted(HOSTILE_HEADERS))
def test_hostile_header_entries_are_one_line_errors(tmp_path, label):
    entry, fragment = HOSTILE_HEADERS[label]
    header = json.dumps({"t": entry}).encode()
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(LoadError, match=fragment) as info:
        read_safetensors(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ranges, data_bytes, fragment", [
    ([[0, 8], [8, 16]], 16, None),
    ([[0, 8], [0, 8]], 16, "not at 8 where the previous tensor ends"),  # b read a's bytes: exit 0, wrong weights
    ([[0, 8], [4, 12]], 16, "not at 8"),
    ([[0, 8], [12, 20]], 20, "not at 8"),
    ([[8, 16], [16, 24]], 24, "starts at 8, not at 0"),
    ([[0, 8], [8, 16]], 20, "ends at 16 but the file holds 20 bytes"),
])
def test_tensor_byte_ranges_tile_the_data_as_the_format_requires(tmp_path, ranges, data_bytes, fragment):
    """Overlapping ranges loaded silently (one tensor read as another); the safetensors library
    refuses every layout but an exact tiling, and so do we."""
    from safetensors import safe_open

    header = json.dumps({name: {"dtype": "F32", "shape": [2], "data_offsets": r}
                         for name, r in zip("ab", ranges)}).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(range(data_bytes)))
    if fragment is None:
        assert set(read_safetensors(path)) == {"a", "b"}
        safe_open(path, "pt").keys()
        return
    with pytest.raises(Exception):
        safe_open(path, "pt")
    with pytest.raises(LoadError, match=fragment) as info:
        read_safetensors(path)
    assert "\n" not in str(info.value)


def test_ple_rows_are_read_from_the_file(tiny_models, tmp_path):
    """The PLE rows a step needs are read with pread (no mapped pages in the process): the same
    values as indexing the mapped table; a replaced table is indexed where it lies."""
    from gemmarun.loading.file_rows import FileRows

    folder, _ = tiny_models("e2b")
    ple = gemmarun.load(folder, dtype="float32", device="cpu").model.ple
    assert ple.file_rows is not None and ple.file_rows.path == (folder / "model.safetensors")
    ids = torch.tensor([[0, 5, 255, 5]])
    from_file = ple.token_part(ids, torch.float32)
    rows = ple.file_rows
    ple.file_rows = None
    assert torch.equal(from_file, ple.token_part(ids, torch.float32))
    ple.table = ple.table.clone()  # another table: the file's rows are no longer its rows
    assert ple.file_rows is None
    with pytest.raises(IndexError, match="row 256 is out of range for a table of 256 rows"):
        rows.read(torch.tensor([256]))
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(10))
    with pytest.raises(OSError, match="short read of table row 1"):
        FileRows(short, 0, 4, 8).read(torch.tensor([1]))


def test_gemma3_bfloat16_checkpoint_norms_keep_one_plus_w_exact(tiny_models, tmp_path):
    """Gemma 3's norms multiply by 1 + w, formed in float32 by the reference: a bfloat16 checkpoint
    (as the released ones are) must not have 1 + w rounded back to bfloat16 (logits moved ~2 %)."""
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_models("gemma3")
    dst = _edit_tensors(folder, tmp_path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    ref = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = [2, 30, 40, 50, 60, 70]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    ours = gemmarun.load(dst, dtype="float32", device="cpu").logits(ids)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-5
    bf = gemmarun.load(dst, dtype="bfloat16", device="cpu")
    assert bf.model.dtype == torch.bfloat16
    stored = load_file(dst / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    norm = bf.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32 and torch.equal(norm, stored.float() + 1.0)


def test_convert_never_writes_over_its_own_source(tiny_models, tmp_path):
    """The writer truncates its output while the source is mapped: over model.safetensors it
    crashed (bus error) and destroyed the checkpoint."""
    from gemmarun.loading.convert import convert

    dst = _copy(tiny_models("gemma3")[0], tmp_path)
    before = (dst / "model.safetensors").read_bytes()
    for victim in ("model.safetensors", "config.json", "tokenizer.json"):
        with pytest.raises(LoadError, match="is one of the source folder's files"):
            convert(dst, dst / victim, "f16", progress=False)
    assert (dst / "model.safetensors").read_bytes() == before
    # an output nowhere to be written had been a bare errno, once the folder was read
    with pytest.raises(LoadError, match=r"out.gguf: no folder .*nowhere to write it in"):
        convert(dst, tmp_path / "nowhere" / "out.gguf", "f16", progress=False)
    with pytest.raises(LoadError, match="is a folder; give the GGUF file's name"):
        convert(dst, tmp_path, "f16", progress=False)


def test_convert_writes_through_a_symlink_and_refuses_a_fifo(tiny_models, tmp_path):
    """The output was renamed over its path: a symlink became a plain file (its target left as it
    was) and a FIFO or device node was replaced by the GGUF."""
    import os
    import stat

    from gemmarun.loading.convert import convert

    folder = tiny_models("gemma3")[0]
    target = tmp_path / "models" / "real.gguf"
    target.parent.mkdir()
    (tmp_path / "out.gguf").symlink_to(target)
    convert(folder, tmp_path / "out.gguf", "f16", progress=False)
    assert (tmp_path / "out.gguf").is_symlink() and target.read_bytes()[:4] == b"GGUF"
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(LoadError, match="pipe.gguf: not a regular file"):
        convert(folder, tmp_path / "pipe.gguf", "f16", progress=False)
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.gguf").st_mode)


def test_a_failed_convert_leaves_the_output_as_it_was(tiny_models, tmp_path, monkeypatch):
    """The GGUF is written beside the output and renamed over it once whole: a conversion that
    failed (or was interrupted) had truncated an existing file and left a broken one behind."""
    from gemmarun.loading import convert as convert_module

    out = tmp_path / "out.gguf"
    out.write_bytes(b"the user's earlier file")
    calls = []

    def failing(name, tensor, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(name, tensor, qtype)

    real = convert_module._encode
    monkeypatch.setattr(convert_module, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(tiny_models("gemma3")[0], out, "q8_0", progress=False)
    assert out.read_bytes() == b"the user's earlier file" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    monkeypatch.setattr(convert_module, "_encode", real)
    convert_module.convert(tiny_models("gemma3")[0], out, "q8_0", progress=False)
    assert gemmarun.load(out).config.family == "gemma3" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_a_fifo_or_a_folder_in_place_of_a_file_is_refused(tiny_models, tmp_path):
    """A FIFO as the model path blocked forever on its first read; a folder named like a weight
    file raised a bare IsADirectoryError."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(LoadError, match="model.gguf: not a regular file"):
        gemmarun.load(fifo)
    dst = _copy(tiny_models("gemma3")[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # in a folder too (a reviewer's find)
        (dst / name).rename(dst / "kept")
        os.mkfifo(dst / name)
        with pytest.raises(LoadError, match=f"{name}: not a regular file"):
            gemmarun.load(dst)
        (dst / name).unlink()
        (dst / "kept").rename(dst / name)
    (dst / "extra.safetensors").mkdir()  # (read where no model.safetensors says which file to read)
    (dst / "model.safetensors").rename(dst / "weights.safetensors")
    with pytest.raises(LoadError, match="extra.safetensors: a folder where the model folder should hold a file"):
        gemmarun.load(dst)


@pytest.mark.parametrize("name, text, fragment", [
    ("config.json", "[]", "must hold a JSON object"),
    ("config.json", "CFG:model_type=\"gemma3\",text_config=\"x\"", "text_config='x' must be an object"),
    ("config.json", "CFG:sliding_window_pattern=0,layer_types=null", "sliding_window_pattern=0 must be a positive integer"),
    ("config.json", "CFG:vocab_size=[256]", "vocab_size=\\[256\\] must be an integer"),
    ("tokenizer.json", "{}", "not a tokenizer"),
    ("tokenizer.json", "not json", "not a tokenizer"),
    ("tokenizer_config.json", "[]", "must hold a JSON object"),
    ("tokenizer_config.json", '{"chat_template": 5}', "chat_template must be"),
    ("chat_template.json", "[]", "must hold a JSON object"),
    ("chat_template.json", '{"chat_template": 5}', "chat_template must be"),
    ("model.safetensors.index.json", "[]", "must hold a JSON object"),
    ("model.safetensors.index.json", '{"weight_map": {"a": 5}}', "corrupt shard index"),
    ("model.safetensors.index.json", '{"weight_map": {"a": ""}}', "shard '' is not a file name"),
    # a probe found shards followed anywhere: a model folder from the internet reading other files
    ("model.safetensors.index.json", '{"weight_map": {"a": "../../x.safetensors"}}', "is not a file name in"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "/etc/passwd"}}', "'/etc/passwd' is not a file name"),
    ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("config.json", '{"vocab_size": ' + "1" * 5000 + "}", "not valid JSON"),
    ("model.safetensors", "HEADER:" + '{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("model.safetensors", "HEADER:" + '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "1" * 5000 + "]}}",
     "corrupt safetensors header"),
])
def test_malformed_json_files_are_one_line_errors(tiny_models, tmp_path, name, text, fragment):
    dst = _copy(tiny_models("gemma3")[0], tmp_path)
    if text.startswith("CFG:"):  # edit config.json's text section
        raw = json.loads((dst / "config.json").read_text())
        section = raw.get("text_config", raw)
        for item in text[4:].split(","):
            key, value = item.split("=")
            section[key] = json.loads(value)
        text = json.dumps(raw)
    if name == "model.safetensors.index.json":  # (read where no model.safetensors comes first)
        (dst / "model.safetensors").rename(dst / "shard.safetensors")
    if text.startswith("HEADER:"):  # a safetensors file with this header
        header = text[7:].encode()
        (dst / name).write_bytes(len(header).to_bytes(8, "little") + header)
    else:
        (dst / name).write_text(text)
    with pytest.raises(ValueError, match=fragment) as e:
        gemmarun.load(dst, device="cpu")
    assert "\n" not in str(e.value)


def test_integer_weights_are_refused_and_ids_past_the_table_are_a_clear_error(tiny_models, tmp_path):
    folder, _ = tiny_models("gemma3")
    q = "model.layers.0.self_attn.q_proj.weight"
    dst = _edit_tensors(folder, tmp_path, lambda t: t.update({q: t[q].to(torch.int32)}))
    with pytest.raises(LoadError, match=r"integer values where floats belong: layers.0.self_attn.q_proj.weight \(int32\)"):
        gemmarun.load(dst, device="cpu")
    raw = json.loads((folder / "config.json").read_text())
    small = tmp_path / "small"
    shutil.copytree(folder, small)
    section = raw.get("text_config", raw)
    embed = "model.embed_tokens.weight"
    section["vocab_size"] = 16
    (small / "config.json").write_text(json.dumps(raw))
    tensors = load_file(small / "model.safetensors")
    tensors[embed] = tensors[embed][:16].contiguous()
    save_file(tensors, small / "model.safetensors")
    llm = gemmarun.load(small, device="cpu")  # (the tokenizer has more ids than the table has rows)
    with pytest.raises(ValueError, match="outside the vocabulary of 16"):
        llm.generate("hello world", max_tokens=2)  # an IndexError deep in the embedding before


def test_the_chat_template_is_found_where_transformers_looks(tmp_path):
    """chat_template.jinja, else chat_template.json (Gemma 3's multimodal repos), else
    tokenizer_config.json; chat_template.json had not been read."""
    from gemmarun.loading.hf import read_chat_template

    assert read_chat_template(tmp_path) == (None, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from tokenizer_config"}))
    assert read_chat_template(tmp_path) == ("from tokenizer_config", None)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert read_chat_template(tmp_path) == ("from chat_template.json", None)
    (tmp_path / "chat_template.jinja").write_text("from the jinja file")
    assert read_chat_template(tmp_path) == ("from the jinja file", None)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"processor_class": "Gemma3Processor"}))
    assert read_chat_template(tmp_path) == ("from tokenizer_config", None)


def test_named_chat_templates_render_as_transformers_picks_them(tiny_models, tmp_path):
    """A list of named templates: "default", and "tool_use" for a prompt with tools (the tools had
    never reached the prompt); with no "default", a prompt without tools is an error, not our own
    renderer's prompt. A GGUF keeps both (tokenizer.chat_template.tool_use)."""
    import shutil

    import gemmarun
    from gemmarun.chat import ChatTemplateError
    from gemmarun.inspect_model import warnings
    from gemmarun.loading.convert import convert

    folder, _ = tiny_models("e2b")
    named = tmp_path / "named"
    shutil.copytree(folder, named)
    config = json.loads((named / "tokenizer_config.json").read_text())
    tool_use = "TOOLS{% for t in tools %}[{{ t.function.name }}]{% endfor %}|{{ messages[0].content }}"
    config["chat_template"] = [{"name": "default", "template": "DEFAULT|{{ messages[0].content }}"},
                               {"name": "tool_use", "template": tool_use}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "hi"}]
    gguf = convert(named, tmp_path / "named.gguf", "f32", progress=False)
    for llm in (gemmarun.load(named), gemmarun.load(gguf)):
        assert llm.render_chat(messages) == "DEFAULT|hi"
        assert llm.render_chat(messages, tools=[tool]) == "TOOLS[get_weather]|hi"
        assert llm.render_chat(messages, tools=[]) == "TOOLS|hi"  # tools given, if none: as transformers
    config["chat_template"] = config["chat_template"][1:] + [{"name": ["odd"], "template": "x"}]  # (skipped)
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    llm = gemmarun.load(named)
    assert llm.has_chat_template and llm.render_chat(messages, tools=[tool]) == "TOOLS[get_weather]|hi"
    with pytest.raises(ChatTemplateError, match='none is "default"'):
        llm.render_chat(messages)
    assert any('none is "default"' in w for w in warnings(llm))  # not a failure of "the" template
    # transformers 5 saves named templates as files: chat_template.jinja + additional_chat_templates/
    del config["chat_template"]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    (named / "chat_template.jinja").write_text("DEFAULT|{{ messages[0].content }}")
    (named / "additional_chat_templates").mkdir()
    (named / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    llm = gemmarun.load(named)
    assert llm.render_chat(messages) == "DEFAULT|hi" and llm.render_chat(messages, tools=[tool]) == "TOOLS[get_weather]|hi"


def test_a_stored_head_must_be_the_token_table(tiny_models, tmp_path):
    """A checkpoint may store lm_head.weight beside a tied config; transformers uses it where it
    differs (it then unties them). It had been dropped without a word: other logits."""
    from gemmarun.loading.convert import convert

    folder, _ = tiny_models("gemma3")
    embed = "model.embed_tokens.weight"
    same = _edit_tensors(folder, tmp_path / "same", lambda t: t.update({"lm_head.weight": t[embed].clone()}))
    assert np.array_equal(gemmarun.load(same).logits([2, 5, 7]), gemmarun.load(folder).logits([2, 5, 7]))
    for name, head in (("other", lambda t: t[embed] + 0.01), ("small", lambda t: torch.zeros(3, 3))):
        dst = _edit_tensors(folder, tmp_path / name, lambda t: t.update({"lm_head.weight": head(t)}))
        with pytest.raises(LoadError, match=r"lm_head.weight differs from the token table .* untied head is not supported"):
            gemmarun.load(dst)
        with pytest.raises(LoadError, match="lm_head.weight differs"):
            convert(dst, tmp_path / f"{name}.gguf", "f16", progress=False)


def test_model_safetensors_is_read_alone_as_transformers_reads_it(tiny_models, tmp_path):
    """Every *.safetensors had been read in name order, so a stray file beside model.safetensors
    (an old copy) replaced its weights without a word."""
    folder, _ = tiny_models("gemma3")
    dst = _copy(folder, tmp_path)
    tensors = load_file(dst / "model.safetensors")
    save_file({k: v + 0.5 for k, v in tensors.items()}, dst / "model_old.safetensors")
    assert np.array_equal(gemmarun.load(dst).logits([2, 5, 7]), gemmarun.load(folder).logits([2, 5, 7]))
    # beside an index naming other (stale) files too: transformers reads model.safetensors first
    save_file({k: v + 0.5 for k, v in tensors.items()}, dst / "stale.safetensors")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(tensors, "stale.safetensors")}))
    assert np.array_equal(gemmarun.load(dst).logits([2, 5, 7]), gemmarun.load(folder).logits([2, 5, 7]))
    (dst / "model.safetensors.index.json").unlink()
    (dst / "stale.safetensors").unlink()
    (dst / "model.safetensors").rename(dst / "a.safetensors")  # no file says which of two to read
    with pytest.raises(LoadError, match="is in two files and there is no model.safetensors or index"):
        gemmarun.load(dst)


def test_convert_writes_nothing_loading_would_refuse(tiny_models, tmp_path):
    """convert had written GGUFs (exit 0) from folders that loading refuses: a missing or
    misshapen tensor (the GGUF failing only when loaded), integer weights (cast to floats:
    garbage that then ran), an unknown tensor (a bare KeyError), NaN weights."""
    from gemmarun.loading.convert import convert

    folder, _ = tiny_models("e2b")
    up, q = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    cases = [
        ("missing", lambda t: t.pop(up), "missing tensors: layers.0.mlp.up_proj.weight"),
        ("shape", lambda t: t.update({q: torch.zeros(3, 3)}), r"wrong shapes: layers.1.self_attn.q_proj.weight \(3, 3\)"),
        ("int8", lambda t: t.update({up: t[up].to(torch.int8)}), r"integer values where floats belong: .*up_proj.weight \(int8\)"),
        ("extra", lambda t: t.update({"model.layers.0.bogus.weight": torch.zeros(2)}), "unexpected tensors: layers.0.bogus.weight"),
        ("nan", lambda t: t[q].view(-1).__setitem__(0, float("nan")), "tensor blk.1.attn_q.weight holds NaN or infinite values"),
    ]
    for name, edit, message in cases:
        dst = _edit_tensors(folder, tmp_path / name, edit)
        with pytest.raises(LoadError, match=message) as e:
            convert(dst, tmp_path / f"{name}.gguf", "q8_0", progress=False)
        assert "\n" not in str(e.value)
        assert not list(tmp_path.glob(f"*{name}.gguf*")), name


def test_convert_names_the_output_it_cannot_write(tiny_models, tmp_path):
    """An unwritable output had been a bare errno naming the hidden partial file; a name ending in
    "/" (a folder meant) wrote a file of that name."""
    from gemmarun.loading.convert import convert

    folder, _ = tiny_models("gemma3")
    with pytest.raises(LoadError, match=r"^convert: cannot write /proc/out.gguf: No such file or directory$"):
        convert(folder, "/proc/out.gguf", "f16", progress=False)
    with pytest.raises(LoadError, match="newdir/: a folder's name, not a file's"):
        convert(folder, f"{tmp_path}/newdir/", "f16", progress=False)
    assert not (tmp_path / "newdir").exists()


def test_integer_tower_weights_are_named(tmp_path):
    """An integer tensor in a Gemma 4 tower failed inside torch's load_state_dict, its message
    cut to "Error(s) in loading state_dict for Encoders:"."""
    from reference_models import build_multimodal

    folder = tmp_path / "mm"
    build_multimodal("e2b", folder)
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.startswith("model.vision_tower.") and k.endswith("q_proj.linear.weight"))
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoadError, match=r"^encoders: integer values where floats belong: vision_tower\..*q_proj.linear.weight \(int8\)$"):
        gemmarun.load(folder)
