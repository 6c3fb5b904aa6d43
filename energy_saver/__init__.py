"""Energy Saver: BCL templates -> construct codecs (issue #4).

Until templates land, the pipeline's translation hook is `PassThroughTranslator`: every
UDP/CoAP payload stays raw and is stored and forwarded as base64.
"""

from __future__ import annotations

from simwire.model import Payload, RawUplink
from simwire.ports import TranslationError


class PassThroughTranslator:
    """Implements `simwire.ports.Translator`; called by integrator.pipeline per uplink."""

    def translate(self, org: str, uplink: RawUplink) -> Payload | TranslationError:
        return Payload(raw=uplink.payload)
