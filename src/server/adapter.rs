//! The user's [`Handler`] as the runtime's [`App`]: each runtime call becomes the matching
//! callback with a [`Ws`] around the session.

use crate::proto::handshake::{self, HttpError, Request};
use crate::proto::CloseCode;
use crate::runtime::app::{Accept, App, Delivery, Session};
use crate::server::{Handler, Message, Upgrade, Ws};

/// A [`Handler`] seen from the shards.
pub(crate) struct HandlerApp<H>(pub H);

impl<H: Handler> App for HandlerApp<H> {
    type State = H::State;

    fn upgrade(&self, req: &Request<'_>) -> Result<Accept<H::State>, HttpError> {
        let mut upgrade = Upgrade::default();
        let state = self.0.on_upgrade(req, &mut upgrade)?;
        Ok(Accept {
            state,
            protocol: upgrade.protocol,
            compress: !upgrade.no_compression,
        })
    }

    fn http(&self, req: &Request<'_>, out: &mut Vec<u8>) {
        match self.0.on_http(req) {
            Some(r) => handshake::write_response(out, r.status, r.reason, r.content_type, &r.body),
            None => HttpError::UpgradeRequired.write_response(out),
        }
    }

    #[inline]
    fn open(&self, session: Session<'_, H::State>) {
        self.0.on_open(&mut Ws { session });
    }

    #[inline]
    fn deliver(&self, session: Session<'_, H::State>, delivery: Delivery<'_>) {
        let ws = &mut Ws { session };
        match delivery {
            Delivery::Text(text) => self.0.on_message(ws, Message::Text(text)),
            Delivery::Binary(bytes) => self.0.on_message(ws, Message::Binary(bytes)),
            Delivery::Fragment {
                text,
                data,
                first,
                last,
            } => self.0.on_fragment(ws, text, data, first, last),
            Delivery::Ping(payload) => self.0.on_ping(ws, payload),
            Delivery::Pong(payload) => self.0.on_pong(ws, payload),
        }
    }

    #[inline]
    fn drain(&self, session: Session<'_, H::State>) {
        self.0.on_drain(&mut Ws { session });
    }

    fn close(&self, session: Session<'_, H::State>, code: Option<CloseCode>, reason: &str) {
        self.0.on_close(&mut Ws { session }, code, reason);
    }
}
