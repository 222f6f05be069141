"""Fuzzing the NDEF codec: whatever tag is held to the reader, the result is records, an offer or an NdefError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from drivers.base import JoinOffer
from drivers.nfc.ndef import (
    JOIN_TYPE,
    MAX_PAYLOAD,
    TNF_EXTERNAL,
    TNF_UNCHANGED,
    NdefError,
    NdefRecord,
    NoJoinOfferError,
    OfferTooLargeError,
    decode_join_offer,
    decode_join_payload,
    decode_message,
    encode_join_offer,
    encode_record,
)

_records = st.builds(
    NdefRecord,
    tnf=st.integers(0, TNF_UNCHANGED),
    type=st.one_of(st.binary(max_size=16), st.sampled_from([JOIN_TYPE, b"THOX.AI:JOIN", b"U", b"T"])),
    payload=st.one_of(st.binary(max_size=32), st.binary(min_size=250, max_size=300)),  # short and long records
    id=st.binary(max_size=4),
    chunked=st.booleans(),
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _message(records: list[NdefRecord]) -> bytes:
    last = len(records) - 1
    return b"".join(encode_record(r, mb=i == 0, me=i == last) for i, r in enumerate(records))


def _join_record(payload: bytes, *, header_first: bytes = b"") -> bytes:
    return header_first + encode_record(NdefRecord(TNF_EXTERNAL, JOIN_TYPE, payload), mb=not header_first)


def _check_offer(message: bytes) -> JoinOffer | None:
    """Decode an offer; if one comes out, it must survive being offered again (encode, then decode)."""
    try:
        offer = decode_join_offer(message)
    except NdefError:
        return None
    try:
        again = encode_join_offer(offer)
    except NdefError:  # re-encoding adds the defaulted fields, which may no longer fit
        return offer
    assert decode_join_offer(again) == offer
    return offer


@given(st.lists(_records, min_size=1, max_size=4))
def test_any_records_round_trip(records: list[NdefRecord]) -> None:
    assert decode_message(_message(records)) == records


@given(st.binary(max_size=300))
@example(b"\xd4\x0c")  # a header cut after the type length
@example(b"\xc4\x0c\xff\xff\xff\xff" + JOIN_TYPE)  # a long record claiming a 4 GiB payload
def test_random_bytes_decode_or_are_refused(message: bytes) -> None:
    try:
        records = decode_message(message)
    except NdefError as exc:
        refusal, records = str(exc), []
    else:
        refusal = ""
    assert not refusal or refusal.startswith("NDEF record"), refusal  # names the record and its offset
    assert sum(len(r.type) + len(r.id) + len(r.payload) for r in records) <= len(message)
    _check_offer(message)


@given(st.lists(_records, max_size=3), st.data())
def test_truncated_or_padded_messages_decode_or_are_refused(records: list[NdefRecord], data: st.DataObject) -> None:
    message = _message(records)
    cut = data.draw(st.integers(0, len(message)), label="cut")
    padding = data.draw(st.binary(max_size=8), label="padding")  # a tag's memory after the message's end
    _check_offer(message[:cut] + padding)


@given(_json)
def test_any_json_payload_is_an_offer_or_a_clear_error(value: Any) -> None:
    payload = json.dumps(value).encode()
    offer = _check_offer(_join_record(payload))
    if offer is None:
        with pytest.raises(NdefError) as caught:
            decode_join_payload(payload)
        assert not isinstance(caught.value, NoJoinOfferError)  # there was a join record: it is malformed


@given(
    st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), _json),
            "node": st.one_of(st.text(max_size=12), _json),
            "ep": st.one_of(st.text(max_size=12), _json),
        },
        optional={
            "tok": st.one_of(st.text(max_size=12), _json),
            "exp": st.one_of(st.integers(), _json),
            "fp": st.one_of(st.text(max_size=12), _json),
        },
    ),
    st.booleans(),
)
def test_offer_shaped_payloads_are_an_offer_or_a_clear_error(body: dict[str, Any], behind_a_uri: bool) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    first = encode_record(NdefRecord(1, b"U", b"\x04thox.ai"), me=False) if behind_a_uri else b""
    _check_offer(_join_record(payload, header_first=first))


@given(st.binary(max_size=MAX_PAYLOAD + 16))
def test_random_payload_bytes_are_an_offer_or_a_clear_error(payload: bytes) -> None:
    _check_offer(_join_record(payload))


@given(
    st.builds(
        JoinOffer,
        node_id=st.text(max_size=40),
        endpoint=st.text(max_size=40),
        token=st.text(max_size=60),
        expires_at=st.integers(min_value=-1, max_value=2**64),
        extra=st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=3),
    )
)
def test_any_offer_round_trips_or_is_refused_when_encoding(offer: JoinOffer) -> None:
    try:
        message = encode_join_offer(offer)
    except NdefError:
        return
    assert len(message) <= 3 + len(JOIN_TYPE) + MAX_PAYLOAD
    assert decode_join_offer(message) == offer


# --- regressions ---------------------------------------------------------------------------------------------


def test_deeply_nested_json_payload_is_refused() -> None:
    # A long record of 100000 '[' made json.loads raise RecursionError.
    with pytest.raises(OfferTooLargeError, match="payload is 100000 bytes; the most an NFC offer carries is 240"):
        decode_join_offer(_join_record(b"[" * 100_000))


def test_number_too_long_for_int_is_refused() -> None:
    # A 5000-digit "exp" made json.loads raise ValueError (Python's int string conversion limit).
    payload = b'{"v":1,"node":"n","ep":"h:1","exp":' + b"1" * 5000 + b"}"
    with pytest.raises(OfferTooLargeError, match="payload is 5036 bytes"):
        decode_join_offer(_join_record(payload))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (rb'{"v":1,"node":"\ud800","ep":"h:1"}', r"field 'node' holds a lone UTF-16 surrogate \('\\ud800' at"),
        (rb'{"v":1,"node":"n","ep":"h:1","tok":"a\udfff"}', r"field 'tok' holds a lone UTF-16 surrogate"),
        (rb'{"v":1,"node":"n","ep":"h:1","\udc00":"x"}', r"field name '\\udc00' holds a lone UTF-16 surrogate"),
    ],
)
def test_lone_surrogates_in_the_offer_are_refused(payload: bytes, reason: str) -> None:
    # Used to decode into a JoinOffer whose text could not be encoded: re-offering, logging to a UTF-8 file or
    # storing it raised UnicodeEncodeError far from the tag.
    with pytest.raises(NdefError, match=reason):
        decode_join_offer(_join_record(payload))


def test_encoding_an_offer_with_a_lone_surrogate_is_an_ndef_error() -> None:
    # Used to raise UnicodeEncodeError out of encode_join_offer.
    with pytest.raises(NdefError, match=r"'n' has text that is not valid Unicode \('\\ud800'\)"):
        encode_join_offer(JoinOffer("n", "h:1", token="\ud800"))


@pytest.mark.parametrize("value", ["", None, 7])
def test_encoder_refuses_extra_fields_the_decoder_refuses(value: object) -> None:
    # JoinOffer("0", "0", extra={"": ""}) used to encode to a tag that decode_join_offer refused ("is empty").
    with pytest.raises(NdefError, match="extra field 'x' must be a non-empty string"):
        # `value` is not always a str, on purpose: the encoder must refuse what the decoder refuses.
        encode_join_offer(JoinOffer("n", "h:1", extra={"x": value}))  # type: ignore[dict-item]


def test_surrogate_pairs_escaped_in_json_are_ordinary_text() -> None:
    offer = decode_join_offer(_join_record(rb'{"v":1,"node":"\ud83d\ude00","ep":"h:1"}'))
    assert offer.node_id == "\N{GRINNING FACE}"
