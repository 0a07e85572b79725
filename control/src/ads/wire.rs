//! gRPC framing for the ADS streams, done here rather than by tonic's codec so that no
//! buffer outlives the message it carries. tonic keeps one encoding and one decoding buffer
//! per stream for the stream's life, each as large as the most it ever held: a
//! state-of-the-world stream that once took every cluster (a megabyte at a thousand
//! services) or sent every endpoint name in an ACK kept that much for as long as its proxy
//! stayed connected.
//!
//! - [`Requests`] gathers a request's bytes as the transport hands them over and decodes the
//!   message as soon as it is whole; nothing of it is kept after.
//! - [`Wire`] is a resource's encoding, a range of one block per list of resources, encoded
//!   once per configuration and shared by every stream.
//! - [`Outgoing`] is an encoded response: a head encoded for this stream, then [`Parts`]:
//!   the resources it sends, where neighbours in a block are one slice of it.
//! - [`Responses`] is the response body: a slice of [`PIECE`] bytes or more goes as it is,
//!   uncopied; smaller ones are copied together into pieces of at most that. A stream
//!   holds only the responses waiting for the transport, and ends with the stream's status
//!   in trailers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tokio::sync::mpsc;
use tonic::Status;

/// The largest request message accepted (tonic's default limit): a state-of-the-world
/// request naming [`super::MAX_SUBSCRIBED_NAMES`] resources fits.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes of small parts copied into one piece of the response body.
pub const PIECE: usize = 16 * 1024;

/// The gRPC message header: a compression flag and a 4-byte big-endian length.
const HEADER: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The request messages of one stream, decoded from its body as each is whole.
pub struct Requests<M> {
    body: Pin<Box<BoxBody>>,
    /// Received and not yet decoded.
    pending: VecDeque<Bytes>,
    buffered: usize,
    ended: bool,
    message: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Requests<M> {
    pub fn new<B>(body: B) -> Requests<M>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Requests {
            body: Box::pin(body.map_err(Into::into).boxed_unsync()),
            pending: VecDeque::new(),
            buffered: 0,
            ended: false,
            message: PhantomData,
        }
    }

    /// The next message; `None` when the client has closed its side between messages.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(m) = self.take()? {
                return Ok(Some(m));
            }
            if self.ended {
                return if self.buffered == 0 {
                    Ok(None)
                } else {
                    Err(Status::invalid_argument(
                        "the request stream ended inside a message",
                    ))
                };
            }
            let frame = std::future::poll_fn(|cx| self.body.as_mut().poll_frame(cx)).await;
            match frame {
                None => self.ended = true,
                Some(Err(e)) => {
                    return Err(Status::cancelled(format!(
                        "reading the request stream: {e}"
                    )));
                }
                Some(Ok(frame)) => {
                    // Trailers, which a request stream does not carry, are ignored.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        self.buffered += data.len();
                        self.pending.push_back(data);
                    }
                }
            }
        }
    }

    /// Decodes the first message if it is all here.
    fn take(&mut self) -> Result<Option<M>, Status> {
        if self.buffered < HEADER {
            return Ok(None);
        }
        let mut header = [0u8; HEADER];
        let mut filled = 0;
        for piece in &self.pending {
            let n = piece.len().min(HEADER - filled);
            header[filled..filled + n].copy_from_slice(&piece[..n]);
            filled += n;
            if filled == HEADER {
                break;
            }
        }
        if header[0] != 0 {
            return Err(Status::unimplemented(
                "compressed request messages are not accepted (send them uncompressed)",
            ));
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_REQUEST_BYTES {
            return Err(Status::resource_exhausted(format!(
                "a request message of {len} bytes; the limit is {MAX_REQUEST_BYTES}"
            )));
        }
        if self.buffered < HEADER + len {
            return Ok(None);
        }
        self.advance(HEADER);
        let bytes = self.split(len);
        self.buffered -= HEADER + len;
        M::decode(bytes)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("a request that does not decode: {e}")))
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.pending.front_mut() else {
                return;
            };
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.pending.pop_front();
        }
    }

    /// The next `len` bytes: a slice of the first piece when it holds them all, else a copy.
    fn split(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.pending.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.pending.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            let n = front.len().min(len - out.len());
            out.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
        out.freeze()
    }
}

/// One response message, encoded: its gRPC header and head, then shared parts.
#[derive(Debug)]
pub struct Outgoing {
    parts: Vec<Bytes>,
    len: usize,
}

impl Outgoing {
    /// `message` encoded whole.
    pub fn message<M: prost::Message>(message: &M) -> Result<Outgoing, Status> {
        Outgoing::with_parts(message, Parts::default())
    }

    /// `head` followed by `parts`, each already an encoded field of the same message (a
    /// message's fields may come in any order, and a repeated field's entries are read in
    /// the order they come).
    pub fn with_parts<M: prost::Message>(head: &M, parts: Parts) -> Result<Outgoing, Status> {
        let head_len = head.encoded_len();
        let len = head_len + parts.runs.iter().map(Wire::len).sum::<usize>();
        let Ok(wire_len) = u32::try_from(len) else {
            return Err(Status::internal(format!(
                "a response of {len} bytes is more than gRPC can frame"
            )));
        };
        let mut first = BytesMut::with_capacity(HEADER + head_len);
        first.put_u8(0);
        first.put_u32(wire_len);
        head.encode_raw(&mut first);
        let mut all = Vec::with_capacity(1 + parts.runs.len());
        all.push(first.freeze());
        all.extend(parts.runs.iter().map(Wire::bytes));
        Ok(Outgoing { parts: all, len })
    }

    /// The message's encoded length (the gRPC header aside).
    pub fn encoded_len(&self) -> usize {
        self.len
    }
}

/// A stream's responses on their way to the transport, boxed: the channel keeps a block of
/// slots per stream, and a boxed slot is a pointer where an unboxed one is a status.
pub type Tx = mpsc::Sender<Box<Result<Outgoing, Status>>>;

/// The response body of a stream: the responses sent on its channel, then the status it
/// ended with (OK when the channel closed without one).
pub struct Responses {
    rx: mpsc::Receiver<Box<Result<Outgoing, Status>>>,
    parts: VecDeque<Bytes>,
    ended: bool,
}

impl Responses {
    pub fn new(rx: mpsc::Receiver<Box<Result<Outgoing, Status>>>) -> Responses {
        Responses {
            rx,
            parts: VecDeque::new(),
            ended: false,
        }
    }

    /// The gRPC response: headers now, the body as responses come.
    pub fn into_http(self) -> http::Response<tonic::body::Body> {
        let mut response = http::Response::new(tonic::body::Body::new(self));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }

    /// The next piece of the body: a large part as it is, or small ones copied together.
    fn piece(&mut self) -> Option<Bytes> {
        let first = self.parts.pop_front()?;
        if first.len() >= PIECE
            || self
                .parts
                .front()
                .is_none_or(|p| first.len() + p.len() > PIECE)
        {
            return Some(first);
        }
        let mut size = first.len();
        let mut n = 0;
        for p in &self.parts {
            if size + p.len() > PIECE {
                break;
            }
            size += p.len();
            n += 1;
        }
        let mut out = BytesMut::with_capacity(size);
        out.put_slice(&first);
        for p in self.parts.drain(..n) {
            out.put_slice(&p);
        }
        Some(out.freeze())
    }

    fn trailers(status: &Status) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        if status.add_header(&mut map).is_err() {
            map.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Frame::trailers(map)
    }
}

impl http_body::Body for Responses {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(piece) = self.piece() {
                if self.parts.is_empty() {
                    // Not kept between messages at the most it ever held.
                    self.parts = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(item)) => match *item {
                    // The parts are only looked at when the last message's are gone.
                    Ok(out) => self.parts = VecDeque::from(out.parts),
                    Err(status) => {
                        self.ended = true;
                        return Poll::Ready(Some(Ok(Responses::trailers(&status))));
                    }
                },
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(Some(Ok(Responses::trailers(&Status::ok("")))));
                }
            }
        }
    }
}

/// One resource's encoding as an entry of a response's repeated field: a range of the block
/// its whole list was encoded into at once ([`encode_list`]). Resources a response sends in
/// their list's order are neighbours in the block, and [`Parts`] sends them as one slice of
/// it: a push of a thousand clusters to a thousand proxies is a thousand handles on one
/// block, neither copied per stream nor a handle per resource.
#[derive(Clone, Debug, Default)]
pub struct Wire {
    block: Bytes,
    start: usize,
    end: usize,
}

impl Wire {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.block[self.start..self.end]
    }

    /// Whether `next` starts in the same block where this one ends.
    fn precedes(&self, next: &Wire) -> bool {
        self.end == next.start
            && self.block.as_ptr() == next.block.as_ptr()
            && self.block.len() == next.block.len()
    }

    fn bytes(&self) -> Bytes {
        self.block.slice(self.start..self.end)
    }
}

impl PartialEq for Wire {
    fn eq(&self, other: &Wire) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// Encodes a list's entries into one block: `encode` writes entry `i` to the buffer, and
/// entry `i`'s [`Wire`] is what it wrote.
pub fn encode_list(count: usize, mut encode: impl FnMut(usize, &mut BytesMut)) -> Vec<Wire> {
    let mut out = BytesMut::new();
    let mut bounds = Vec::with_capacity(count);
    for i in 0..count {
        let start = out.len();
        encode(i, &mut out);
        bounds.push((start, out.len()));
    }
    let block = out.freeze();
    bounds
        .into_iter()
        .map(|(start, end)| Wire {
            block: block.clone(),
            start,
            end,
        })
        .collect()
}

/// The shared parts of one response, in order; a part that follows the last one in its
/// block lengthens it instead of adding one.
#[derive(Debug, Default)]
pub struct Parts {
    runs: Vec<Wire>,
}

impl Parts {
    pub fn push(&mut self, wire: &Wire) {
        match self.runs.last_mut() {
            Some(last) if last.precedes(wire) => last.end = wire.end,
            _ => self.runs.push(wire.clone()),
        }
    }

    /// How many slices the parts are (runs of neighbours count once).
    pub fn slices(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use lumen_api::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use lumen_api::pb::google::protobuf::Any;

    fn framed(m: &impl prost::Message) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((m.encoded_len() as u32).to_be_bytes());
        out.extend(m.encode_to_vec());
        out
    }

    type TestBody = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    /// A body that hands over `pieces` as its data frames.
    fn body(pieces: Vec<Vec<u8>>) -> TestBody {
        let frames: Vec<_> = pieces
            .into_iter()
            .map(|p| Ok(Frame::data(Bytes::from(p))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    fn request(names: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: "t".into(),
            resource_names: (0..names)
                .map(|i| format!("outbound|9080||svc-{i}"))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn messages_are_decoded_across_and_within_frames() {
        let (a, b) = (request(300), request(2));
        let mut wire = framed(&a);
        wire.extend(framed(&b));
        wire.extend(framed(&a));
        // Frames cut anywhere: inside a header, inside a message, two messages in one.
        let cuts = [3, 7, 5000, wire.len() - 40];
        let mut pieces = Vec::new();
        let mut at = 0;
        for c in cuts {
            pieces.push(wire[at..c].to_vec());
            at = c;
        }
        pieces.push(wire[at..].to_vec());
        let mut requests = Requests::<DiscoveryRequest>::new(body(pieces));
        assert_eq!(requests.message().await.unwrap(), Some(a.clone()));
        assert_eq!(requests.message().await.unwrap(), Some(b));
        assert_eq!(requests.message().await.unwrap(), Some(a));
        assert_eq!(requests.message().await.unwrap(), None);
        assert_eq!(requests.buffered, 0);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_what_is_wrong() {
        let mut wire = framed(&request(1));
        wire[0] = 1;
        let err = Requests::<DiscoveryRequest>::new(body(vec![wire]))
            .message()
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

        // Too big: refused from its header, before its bytes are gathered.
        let mut header = vec![0];
        header.extend(((MAX_REQUEST_BYTES + 1) as u32).to_be_bytes());
        let err = Requests::<DiscoveryRequest>::new(body(vec![header]))
            .message()
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("limit"), "{err:?}");

        let wire = framed(&request(5));
        let err = Requests::<DiscoveryRequest>::new(body(vec![wire[..wire.len() - 1].to_vec()]))
            .message()
            .await
            .unwrap_err();
        assert!(err.message().contains("ended inside a message"), "{err:?}");

        let mut garbage = vec![0, 0, 0, 0, 3];
        garbage.extend([0xff, 0xff, 0xff]);
        let err = Requests::<DiscoveryRequest>::new(body(vec![garbage]))
            .message()
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }

    #[tokio::test]
    async fn a_response_of_shared_parts_goes_in_few_slices_decodes_whole_and_ends_with_a_status() {
        let resources: Vec<Any> = (0..200)
            .map(|i| Any {
                type_url: "type.googleapis.com/x".into(),
                value: vec![i as u8; 40 + i * 3],
            })
            .collect();
        let wires = encode_list(resources.len(), |i, out| {
            prost::encoding::message::encode(2, &resources[i], out);
        });
        // Two runs of neighbours (0..120, 130..200), then one resource of a list of its own.
        let other = Any {
            type_url: "type.googleapis.com/y".into(),
            value: b"alone".to_vec(),
        };
        let lone = encode_list(1, |_, out| prost::encoding::message::encode(2, &other, out));
        let mut parts = Parts::default();
        let chosen: Vec<usize> = (0..120).chain(130..200).collect();
        for &i in &chosen {
            parts.push(&wires[i]);
        }
        parts.push(&lone[0]);
        assert_eq!(parts.slices(), 3, "neighbours in a block go as one slice");
        let mut resources: Vec<Any> = chosen.iter().map(|&i| resources[i].clone()).collect();
        resources.push(other);
        let head = DiscoveryResponse {
            version_info: "v1".into(),
            type_url: "t".into(),
            nonce: "7".into(),
            ..Default::default()
        };
        let out = Outgoing::with_parts(&head, parts).unwrap();
        let whole = DiscoveryResponse {
            resources: resources.clone(),
            ..head.clone()
        };
        assert_eq!(out.encoded_len(), prost::Message::encoded_len(&whole));
        let (tx, rx) = mpsc::channel(4);
        tx.send(Box::new(Ok(out))).await.unwrap();
        tx.send(Box::new(Ok(Outgoing::message(&head).unwrap())))
            .await
            .unwrap();
        tx.send(Box::new(Err(Status::unavailable("going away"))))
            .await
            .unwrap();
        drop(tx);
        let mut sent = Responses::new(rx);
        let mut data = Vec::new();
        let mut trailers = None;
        let mut frames = 0;
        while let Some(frame) = sent.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => {
                    frames += 1;
                    data.extend_from_slice(&d);
                }
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(
            trailers["grpc-message"], "going%20away",
            "percent-encoded, as gRPC says"
        );
        // The first response as its head, its two runs (uncopied) and the lone part; then
        // the second response's head.
        assert_eq!(frames, 5, "{frames} data frames");
        let mut responses = Requests::<DiscoveryResponse>::new(body(vec![data]));
        assert_eq!(responses.message().await.unwrap(), Some(whole));
        assert_eq!(responses.message().await.unwrap(), Some(head));
        assert_eq!(responses.message().await.unwrap(), None);
    }
}
