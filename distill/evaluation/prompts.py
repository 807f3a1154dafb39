"""Prompt files and the video names VBench reads prompts from.

A prompt file is plain text (one prompt a line; blank lines and lines starting
with '#' are skipped) or VBench's JSON prompt list (`VBench_full_info.json`:
a list of {"prompt_en": ..., "dimension": [...]}; a list of strings or of
{"prompt": ...} is read too). Each prompt is sampled `samples` times, video
`index` from seed `seed + index`, and written as `{prompt}-{index}.mp4`: the
name VBench's standard mode looks for and its custom mode reads the prompt
back from."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

NAME_BYTES = 240  # a file name is at most 255 bytes on common file systems; room for "-NN.mp4"


class PromptFileError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    """One video to write: the prompt's position in the file, its sample index and seed."""

    prompt_index: int
    prompt: str
    index: int
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.prompt}-{self.index}.mp4"


def read_prompts(path: Path, key: str = "--prompts") -> List[str]:
    """The prompts of a file; PromptFileError naming `key`, the file and the line when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{key}={path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = _json_prompts(path, text, key)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PromptFileError(f"{key}={path}: holds no prompt")
    for number, prompt in enumerate(prompts, 1):
        problem = name_problem(prompt)
        if problem:
            raise PromptFileError(f"{key}={path}, prompt {number} ({prompt[:60]!r}): {problem}")
    return prompts


def _json_prompts(path: Path, text: str, key: str) -> List[str]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{key}={path}: not JSON ({err})") from None
    if not isinstance(entries, list):
        raise PromptFileError(f"{key}={path}: a JSON prompt file is a list (VBench's prompt list)")
    prompts = []
    for number, entry in enumerate(entries, 1):
        prompt = entry if isinstance(entry, str) else isinstance(entry, dict) and (entry.get("prompt_en")
                                                                                 or entry.get("prompt"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{key}={path}, entry {number}: neither a string nor an object with "
                                  "'prompt_en' or 'prompt'")
        prompts.append(prompt.strip())
    return prompts


def name_problem(prompt: str):
    """Why `prompt` cannot name its video file (VBench reads the prompt from the name)."""
    if "/" in prompt or "\0" in prompt:
        return "holds '/', which no file name can"
    if len(prompt.encode("utf-8")) > NAME_BYTES:
        return f"longer than {NAME_BYTES} bytes, too long for a file name"
    return None


def items(prompts: List[str], samples: int, seed: int) -> List[Item]:
    """Every video of the evaluation, prompt by prompt; a prompt listed twice is sampled once."""
    unique = list(dict.fromkeys(prompts))
    return [Item(p, prompt, i, seed + i) for p, prompt in enumerate(unique) for i in range(samples)]


def shard(all_items: List[Item], rank: int, world: int) -> List[Item]:
    """Rank r's videos: every world-th item from r, so each rank gets a share of every prompt."""
    return all_items[rank::world]
