//! Rewrites the two kinds of status tonic itself answers, before any handler runs, that the
//! contract codes differently (API.md):
//!
//! - a request larger than `max_decoding_message_size` is OUT_OF_RANGE in tonic; the contract
//!   says RESOURCE_EXHAUSTED for a message over the size limit;
//! - a request body that is not a valid message of the RPC's type (bytes that are not protobuf,
//!   a `string` field that is not UTF-8, a wrong wire type, nesting past prost's recursion
//!   limit, a truncated frame, no message at all) is INTERNAL in tonic (following gRPC's
//!   status-code guide); to a client that is its own malformed input, which the contract codes
//!   INVALID_ARGUMENT. tonic's message is kept: prost's names the message and field.
//!
//! Each is recognised by tonic's own message, in the response headers where a call refused
//! before its handler carries its status; every other status passes untouched. The matching is
//! exact on purpose: an INTERNAL from a handler (`ServiceError::Internal`, "internal error: ...",
//! e.g. a stored response that no longer decodes) is a server fault and stays INTERNAL.
//! Left alone as well: a message with the compressed flag and no `grpc-encoding`, or an invalid
//! flag, which gRPC's compression spec requires to be INTERNAL.
//! Imports nothing from the crate: it works on raw HTTP responses.

use http::{HeaderMap, HeaderValue, Response};
use tonic::body::Body;

/// gRPC status codes as they appear in the `grpc-status` header.
const INVALID_ARGUMENT: &str = "3";
const RESOURCE_EXHAUSTED: &str = "8";
const OUT_OF_RANGE: &str = "11";
const INTERNAL: &str = "13";

/// tonic's message for a request over the size limit (it goes on with the sizes).
const TOO_LARGE: &str = "message length too large";
/// tonic-prost's message for a protobuf decode failure: `prost::DecodeError`'s display, which
/// goes on with "Message.field: why".
const NOT_PROTOBUF_PREFIX: &str = "failed to decode Protobuf message";
/// tonic's messages for a unary request body that ends inside a message, or holds none.
const FRAME_MESSAGES: [&str; 2] = ["Unexpected EOF decoding stream.", "Missing request message."];

/// The response mapping; install with `tower::util::MapResponseLayer::new(remap_oversize)`.
pub fn remap_oversize(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    // A successful unary answer carries its status in the trailers: nothing to look at.
    let Some(code) = headers.get("grpc-status").and_then(|code| code.to_str().ok()) else {
        return response;
    };
    let remapped = remapped_code(code, message(headers).as_deref());
    if let Some(code) = remapped {
        headers.insert("grpc-status", HeaderValue::from_static(code));
    }
    response
}

/// The contract's code for tonic's `code` and `message`, when it differs.
fn remapped_code(code: &str, message: Option<&str>) -> Option<&'static str> {
    match code {
        OUT_OF_RANGE if message.is_some_and(|message| message.contains(TOO_LARGE)) => {
            metrics::counter!("allot_shed_requests_total", "reason" => "message_too_large").increment(1);
            Some(RESOURCE_EXHAUSTED)
        }
        INTERNAL
            if message.is_some_and(|message| {
                message.starts_with(NOT_PROTOBUF_PREFIX) || FRAME_MESSAGES.contains(&message)
            }) =>
        {
            Some(INVALID_ARGUMENT)
        }
        _ => None,
    }
}

/// The same rewriting for a status a handler reads from a request stream (ReserveStream's
/// later messages are decoded after the call started, so the status never passes through
/// `remap_oversize`'s headers).
pub fn remap_status(status: tonic::Status) -> tonic::Status {
    let code = (status.code() as i32).to_string();
    match remapped_code(&code, Some(status.message())) {
        Some(remapped) => {
            let code = tonic::Code::from(remapped.parse::<i32>().expect("a status code"));
            tonic::Status::new(code, status.message())
        }
        None => status,
    }
}

/// The `grpc-message` header, percent-decoded (tonic encodes spaces and a few other bytes).
fn message(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get("grpc-message")?.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let escaped = (raw[index] == b'%')
            .then(|| raw.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(raw[index]);
                index += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&decoded).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &'static str, message: &str) -> Response<Body> {
        let status = tonic::Status::new(tonic::Code::from_bytes(code.as_bytes()), message.to_string());
        status.into_http()
    }

    fn code_of(response: &Response<Body>) -> &[u8] {
        response.headers()["grpc-status"].as_bytes()
    }

    #[test]
    fn tonic_refusals_get_the_contract_codes() {
        // Goal: tonic's own refusals of a malformed or oversized request get the contract's
        // codes, and the message survives. Method: build each status as tonic does (its
        // message, percent-encoded by `into_http`) and map it.
        let cases = [
            ("11", "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes", b"8"),
            (
                "13",
                "failed to decode Protobuf message: ReserveLine.sku: ReserveRequest.lines: invalid string \
                 value: data is not UTF-8 encoded",
                b"3",
            ),
            ("13", "failed to decode Protobuf message: recursion limit reached", b"3"),
            ("13", "Unexpected EOF decoding stream.", b"3"),
            ("13", "Missing request message.", b"3"),
        ];
        for (code, text, expected) in cases {
            let response = remap_oversize(refused(code, text));
            assert_eq!(code_of(&response), expected, "{text}");
            assert_eq!(message(response.headers()).as_deref(), Some(text));
        }
    }

    #[test]
    fn server_faults_and_other_statuses_pass_untouched() {
        // Goal: only tonic's exact refusals are rewritten: a handler's INTERNAL (which may
        // quote a decode error of stored data), the compression-flag errors gRPC requires to be
        // INTERNAL, and every other code stay as they are. Method: map each and compare.
        let cases = [
            ("13", "internal error: failed to decode Protobuf message: invalid wire type"),
            (
                "13",
                "internal error: a remembered response does not decode: failed to decode Protobuf message",
            ),
            (
                "13",
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ),
            ("11", "from_sequence 5 is older than the retained history (oldest 9); take a fresh snapshot"),
            ("3", "lines[0].qty: must be positive (got 0)"),
            ("14", "Missing request message."),
        ];
        for (code, text) in cases {
            let response = remap_oversize(refused(code, text));
            assert_eq!(code_of(&response), code.as_bytes(), "{text}");
        }
        let ok = remap_oversize(Response::new(Body::empty()));
        assert!(ok.headers().get("grpc-status").is_none());
    }
}
