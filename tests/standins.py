"""A model adapter for stand-in networks whose outputs are known by hand."""

from distill.models.flow_matching import FlowMatchingAdapter
from distill.models.wan import WanAdapter


class StandInAdapter(FlowMatchingAdapter):
    """Calls module(x_t, timestep, text) and remembers the timestep it passed."""

    family = "stand_in"  # used directly by the tests, never registered

    def forward(self, module, x_t, timestep, text, **cond):
        self.last_timestep = timestep
        return module(x_t, timestep, text)

    def load(self, path, seed, dtype=None):
        raise NotImplementedError("stand-in networks are built by the test")

    def empty(self, path, dtype=None):
        raise NotImplementedError("stand-in networks are built by the test")

    def blocks(self, module):
        return []

    def save(self, module, folder):
        raise NotImplementedError("stand-in networks are not exported")


class StandInWan(StandInAdapter):
    """The stand-in with Wan's conventions for a WanConfig: the first frame held clean,
    each expert's guidance scale, the image conditioning read from a batch."""

    held_velocity = WanAdapter.held_velocity
    guidance = WanAdapter.guidance
    conditioning = WanAdapter.conditioning
