//! tonic answers a request larger than `max_decoding_message_size` with OUT_OF_RANGE; the
//! contract says RESOURCE_EXHAUSTED for a message over the size limit. This layer rewrites that
//! one status (recognised by tonic's own message) in the response headers, where a rejected
//! unary call carries it. Every other status passes untouched.

use http::{HeaderValue, Response};
use tonic::body::Body;

/// The response mapping; install with `tower::util::MapResponseLayer::new(remap_oversize)`.
pub fn remap_oversize(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|code| code.as_bytes() == b"11");
    if out_of_range
        && headers.get("grpc-message").is_some_and(|message| {
            let message = message.as_bytes();
            contains(message, b"message length too large")
                || contains(message, b"message%20length%20too%20large")
        })
    {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        metrics::counter!("allot_shed_requests_total", "reason" => "message_too_large").increment(1);
    }
    response
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}
