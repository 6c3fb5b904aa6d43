"""Energy Saver management: templates, the template tester and the savings figures.

Called by energy_saver.api (HTTP, 1NCE paths under /v1/optimize) and simwire.cli
(`simwire templates test`). Validation lists every problem (422, BCL problems with their
JSON path); the store enforces "one ACTIVE template per protocol" atomically (409). After
each change the translator's table is refreshed, so the next uplink sees it.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, replace
from typing import Any, Protocol

from energy_saver import bcl
from energy_saver.codec import Codec, DecodeError
from energy_saver.translator import CodecCache, TemplateTranslator
from simwire.clock import Clock
from simwire.errors import BadRequest, NotFound, Problems, Unprocessable
from simwire.model import (
    DAY_MS,
    ICCID_RE,
    TRANSLATED_PROTOCOLS,
    SavingsTotals,
    Template,
    TemplateStatus,
)
from simwire.model import (
    Protocol as DeviceProtocol,
)
from simwire.ports import SavingsRepository, TemplateRepository

NAME_MAX = 64
MAX_TEMPLATES = 100
"""Templates per organisation (ACTIVE or not)."""
MAX_TEST_PAYLOAD = 4096
"""Largest payload the tester takes (devices send at most ~1500 bytes)."""
SAVINGS_RANGES = (1, 7, 30)
SAVINGS_KEEP_DAYS = 2 * max(SAVINGS_RANGES)
"""Counters kept: the longest range and the one before it (for `delta`)."""
_FIELDS = frozenset({"name", "template", "protocolFilter", "status"})


def energy_mwh(size: int) -> float:
    """1NCE's energy model of sending `size` bytes: E(x) = 0.013 x + 94.084 mWh."""
    return 0.013 * size + 94.084


def reduction(original: int, optimized: int) -> tuple[int, float]:
    """(bytes saved, energy saved in % of sending the JSON) for one message.

    `original` is the translated JSON's length, `optimized` the binary payload's; 1NCE's
    example: 47 and 10 -> (37, 0.51)."""
    e = energy_mwh(original)
    return original - optimized, round((e - energy_mwh(optimized)) / e * 100, 2)


def tester_result(codec: Codec, payload: bytes) -> dict[str, Any]:
    """The template tester's answer for one payload (API and CLI); raises DecodeError."""
    value, _ = codec.decode(payload)
    text = json_text(value)
    reduced, percent = reduction(len(text.encode()), len(payload))
    return {"translatedPayload": text, "reducedBytes": reduced, "energyUsageReduction": percent}


def to_api(t: Template) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "template": t.template, "status": t.status.value,
            "protocolFilter": [p.value for p in t.protocols]}


def json_text(value: Any) -> str:
    """The translated JSON as 1NCE stringifies it (history, tester): compact, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Repo(TemplateRepository, SavingsRepository, Protocol):
    pass


@dataclass(frozen=True, slots=True)
class _Body:
    name: str | None = None
    template: str | None = None
    protocols: tuple[DeviceProtocol, ...] | None = None
    status: TemplateStatus | None = None


class Templates:
    def __init__(self, repo: _Repo, translator: TemplateTranslator, codecs: CodecCache,
                 clock: Clock) -> None:
        self._repo = repo
        self._translator = translator
        self._codecs = codecs
        self._clock = clock

    async def list_all(self, org: str) -> list[Template]:
        return await self._repo.list_templates(org)

    async def get(self, template_id: str, org: str) -> Template:
        t = await self._repo.get_template(template_id)
        if t is None or t.org != org:  # another tenant's id looks absent
            raise NotFound(f"template {template_id} not found")
        return t

    async def create(self, body: Any, org: str) -> Template:
        b = self._parse_body(body, create=True)
        if len(await self._repo.list_templates(org)) >= MAX_TEMPLATES:
            raise Unprocessable([{"property": "template", "message":
                                  f"at most {MAX_TEMPLATES} templates per organisation"}])
        now = self._clock.now_ms()
        assert b.name is not None
        assert b.template is not None
        assert b.protocols is not None
        t = Template(str(uuid.uuid4()), org, b.name, b.template, b.protocols,
                     b.status or TemplateStatus.INACTIVE, now, now)
        await self._repo.create_template(t)
        await self._translator.refresh()
        return t

    async def update(self, template_id: str, body: Any, org: str) -> Template:
        b = self._parse_body(body, create=False)
        t = await self.get(template_id, org)
        changed = replace(
            t, name=b.name if b.name is not None else t.name,
            template=b.template if b.template is not None else t.template,
            protocols=b.protocols if b.protocols is not None else t.protocols,
            status=b.status or t.status, updated_ms=self._clock.now_ms())
        stored = await self._repo.update_template(changed)
        if stored is None:
            raise NotFound(f"template {template_id} not found")
        await self._translator.refresh()
        return stored

    async def delete(self, template_id: str, org: str) -> None:
        await self.get(template_id, org)
        await self._repo.delete_template(template_id)
        await self._translator.refresh()

    def test(self, body: Any) -> dict[str, Any]:
        """`POST /v1/optimize/messages/test`: translate one payload with a template."""
        problems = Problems()
        if not isinstance(body, dict):
            raise Unprocessable([{"property": "body", "message": "must be a JSON object"}])
        for key in body.keys() - {"template", "payload"}:
            problems.add(key, "unknown property")
        template = body.get("template")
        payload_b64 = body.get("payload")
        codec = None
        if not isinstance(template, str):
            problems.add("template", "is required: the template as a JSON string")
        else:
            try:
                codec = self._codecs.compile(template)
            except bcl.TemplateError as exc:
                _add_template_problems(problems, exc)
        payload = b""
        if not isinstance(payload_b64, str):
            problems.add("payload", "is required: the device payload, base64")
        else:
            try:
                payload = base64.b64decode(payload_b64, validate=True)
            except (binascii.Error, ValueError):
                problems.add("payload", "is not valid base64")
            if len(payload) > MAX_TEST_PAYLOAD:
                problems.add("payload", f"longer than {MAX_TEST_PAYLOAD} bytes")
        problems.raise_any()
        assert codec is not None
        try:
            return tester_result(codec, payload)
        except DecodeError as exc:
            raise BadRequest(str(exc), [{"property": "payload", "message": str(exc)}]) from None

    async def savings(self, org: str, days: int, protocol: DeviceProtocol | None,
                      iccid: str | None) -> dict[str, Any]:
        """Totals over the last `days` UTC days (today included), each with its change
        (`delta`) from the `days` before."""
        today = self._clock.now_ms() // DAY_MS
        now = await self._repo.savings(org, today - days + 1, today, protocol, iccid)
        before = await self._repo.savings(org, today - 2 * days + 1, today - days, protocol,
                                          iccid)
        a, b = _figures(now), _figures(before)
        return {k: {"value": a[k], "delta": round(a[k] - b[k], 2)} for k in a}

    def _parse_body(self, body: Any, create: bool) -> _Body:
        problems = Problems()
        if not isinstance(body, dict):
            raise Unprocessable([{"property": "body", "message": "must be a JSON object"}])
        for key in sorted(body.keys() - _FIELDS):
            problems.add(key, "unknown property")
        if not create and not (body.keys() & _FIELDS):
            problems.add("body", "nothing to change: give name, template, protocolFilter or "
                         "status")
        out = _Body()
        if "name" in body or create:
            name = body.get("name")
            if not isinstance(name, str) or not 1 <= len(name.strip()) <= NAME_MAX:
                problems.add("name", f"is required: 1 to {NAME_MAX} characters")
            else:
                out = replace(out, name=name.strip())
        if "template" in body or create:
            text = body.get("template")
            if not isinstance(text, str):
                problems.add("template", "is required: the BCL template as a JSON string")
            else:
                try:
                    self._codecs.compile(text)
                    out = replace(out, template=text)
                except bcl.TemplateError as exc:
                    _add_template_problems(problems, exc)
        if "protocolFilter" in body or create:
            raw = body.get("protocolFilter", ["COAP"])
            allowed = [p.value for p in TRANSLATED_PROTOCOLS]
            if (not isinstance(raw, list) or not raw or len(set(map(str, raw))) != len(raw)
                    or any(p not in allowed for p in raw)):
                problems.add("protocolFilter", "must be a non-empty list of distinct "
                             f"protocols from {', '.join(allowed)}")
            else:
                out = replace(out, protocols=tuple(DeviceProtocol(p) for p in raw))
        if "status" in body:
            status = body.get("status")
            if status not in ("ACTIVE", "INACTIVE"):
                problems.add("status", "must be ACTIVE or INACTIVE")
            else:
                out = replace(out, status=TemplateStatus(status))
        problems.raise_any()
        return out


def _add_template_problems(problems: Problems, exc: bcl.TemplateError) -> None:
    for p in exc.problems:
        problems.add("template", str(p), path=p.path)


def _figures(t: SavingsTotals) -> dict[str, float]:
    saved = t.original_bytes - t.optimized_bytes
    return {
        "messagesTranslated": t.messages,
        "averageBytesReducedPerMessage": round(saved / t.messages, 2) if t.messages else 0,
        "bytesSaved": saved,
    }


def savings_query(range_raw: str | None, protocol_raw: str | None, iccid: str | None
                  ) -> tuple[int, DeviceProtocol | None, str | None]:
    """Validate `?range=&protocol=&iccid=` of the savings API."""
    problems = Problems()
    days = 7
    if range_raw not in (None, ""):
        if range_raw not in [str(r) for r in SAVINGS_RANGES]:
            problems.add("range", "must be 1, 7 or 30 (days)")
        else:
            days = int(range_raw)
    protocol = None
    if protocol_raw not in (None, ""):
        if protocol_raw not in [p.value for p in TRANSLATED_PROTOCOLS]:
            problems.add("protocol", "must be UDP or COAP")
        else:
            protocol = DeviceProtocol(protocol_raw)
    if iccid in ("",):
        iccid = None
    if iccid is not None and not ICCID_RE.match(iccid):
        problems.add("iccid", "must be 19 or 20 digits")
    if problems.items:
        raise BadRequest("invalid query", problems.items)
    return days, protocol, iccid
