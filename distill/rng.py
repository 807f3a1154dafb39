"""This process's random number generators as a checkpoint part (per rank).

Python's, NumPy's and torch's CPU and CUDA generators; restored last on
resume, after everything else that might draw from them.
"""

import json
import random

import numpy as np
import torch


class ProcessRNG:
    def state_dict(self) -> dict:
        py_version, py_state, py_gauss = random.getstate()
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "torch_cpu": torch.get_rng_state(),
            "python_state": torch.tensor(py_state, dtype=torch.int64),
            "python": json.dumps([py_version, py_gauss]),
            "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
            "numpy": json.dumps([np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]),
        }
        if torch.cuda.is_available():
            state["torch_cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        py_version, py_gauss = json.loads(state["python"])
        random.setstate((py_version, tuple(state["python_state"].tolist()), py_gauss))
        np_kind, np_pos, np_has_gauss, np_gauss = json.loads(state["numpy"])
        np.random.set_state((np_kind, state["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(state["torch_cpu"])
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["torch_cuda"])
