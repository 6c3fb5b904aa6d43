"""The pipeline's Energy Saver step: each organisation's ACTIVE templates, compiled.

`TemplateTranslator.translate` is called by integrator.pipeline for every uplink (hot path,
synchronous): a dict lookup by (organisation, protocol), then the compiled codec. The table
of active templates is rebuilt by `refresh()`, which the templates service awaits after
each change it makes and a background task runs every `template_refresh_s` (changes made
by other processes). Codecs are cached by template digest, so a refresh recompiles only
what changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict

from energy_saver import bcl
from energy_saver.codec import Codec, DecodeError
from simwire.logs import RateLimitedLogger
from simwire.metrics import Metrics
from simwire.model import TRANSLATED_PROTOCOLS, Payload, Protocol, RawUplink
from simwire.ports import TemplateRepository, TranslationError
from simwire.tasks import every

log = logging.getLogger("simwire.energy_saver")


class CodecCache:
    """Template text -> compiled Codec, LRU-bounded (the test endpoint compiles user text
    too: repeated tests of one template compile it once)."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._by_text: OrderedDict[str, Codec] = OrderedDict()

    def compile(self, text: str) -> Codec:
        """Raises bcl.TemplateError for an invalid template."""
        key = hashlib.sha256(text.encode()).hexdigest()
        codec = self._by_text.get(key)
        if codec is None:
            codec = Codec(bcl.parse_text(text))
            self._by_text[key] = codec
            if len(self._by_text) > self._size:
                self._by_text.popitem(last=False)
        else:
            self._by_text.move_to_end(key)
        return codec


class TemplateTranslator:
    """Implements `simwire.ports.Translator` with the store's ACTIVE templates."""

    def __init__(self, repo: TemplateRepository, metrics: Metrics, codecs: CodecCache,
                 refresh_s: float = 2.0) -> None:
        self._repo = repo
        self._codecs = codecs
        self._refresh_s = refresh_s
        self._active: dict[tuple[str, Protocol], Codec] = {}
        self._lock = asyncio.Lock()
        self._warn = RateLimitedLogger(log)
        self._count = {(p, outcome): metrics.translations.labels(p.value, outcome).inc
                       for p in TRANSLATED_PROTOCOLS for outcome in ("translated", "failed")}

    def translate(self, org: str, uplink: RawUplink) -> Payload | TranslationError:
        codec = self._active.get((org, uplink.protocol))
        if codec is None:  # no ACTIVE template for it (LwM2M never has one)
            return Payload(raw=uplink.payload)
        try:
            value, position = codec.decode(uplink.payload)
        except DecodeError as exc:
            self._count[uplink.protocol, "failed"]()
            return TranslationError(str(exc))
        except Exception:  # a codec bug must not lose the message: it is stored raw
            self._warn.exception(f"codec:{codec.digest}", "template %s failed on a payload",
                                 codec.digest[:12])
            self._count[uplink.protocol, "failed"]()
            return TranslationError("Translation failed: internal error")
        self._count[uplink.protocol, "translated"]()
        return Payload(raw=uplink.payload, json_value=value, translated=True,
                       position=position)

    def active(self, org: str, protocol: Protocol) -> Codec | None:
        return self._active.get((org, protocol))

    async def refresh(self) -> None:
        """Reload the ACTIVE templates; a stored template that no longer compiles (stored
        by an older version, say) is skipped with an error log, never half-applied."""
        async with self._lock:
            table: dict[tuple[str, Protocol], Codec] = {}
            for t in await self._repo.active_templates():
                try:
                    codec = self._codecs.compile(t.template)
                except bcl.TemplateError as exc:
                    self._warn.error(f"invalid:{t.id}", "ACTIVE template %s is invalid, not "
                                     "applied: %s", t.id, exc)
                    continue
                for protocol in t.claims:
                    if protocol in TRANSLATED_PROTOCOLS:
                        table[t.org, protocol] = codec
            self._active = table

    async def run_forever(self) -> None:
        """Background task (simwire.app): pick up other processes' changes."""
        await every(self._refresh_s, self.refresh,
                    lambda exc: log.exception("template refresh failed; retrying"))
