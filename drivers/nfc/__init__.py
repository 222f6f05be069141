"""NFC: the join-offer NDEF codec, the Type 3 Tag memory layout, and the nfcpy-backed NfcLink.

`ndef` and `tag3` are pure codecs; `nfcpy_link` is the only module that imports nfcpy, so importing this
package does not load it.
"""
