//! The user's [`Handler`] as the runtime's [`App`]: each runtime call becomes the matching
//! callback with a [`Ws`] around the session.

use std::sync::{Arc, OnceLock};

use crate::proto::handshake::{HttpError, Request};
use crate::proto::CloseCode;
use crate::runtime::app::{Accept, App, DeferKey, Delivery, Session, Verdict};
use crate::runtime::command::Mailbox;
use crate::server::{metrics, Decision, Handler, HttpResponse, Message, Upgrade, Ws};

/// A [`Handler`] seen from the shards, with what the server answers itself.
pub(crate) struct HandlerApp<H> {
    /// The application.
    pub handler: H,
    /// Where the built-in Prometheus endpoint answers, if anywhere.
    pub metrics_path: Option<String>,
    /// Every shard's mailbox, once the shards run (for the metrics endpoint).
    pub mailboxes: OnceLock<Arc<[Arc<Mailbox>]>>,
}

impl<H: Handler> HandlerApp<H> {
    fn answer_metrics(&self) -> HttpResponse {
        let snapshot = self
            .mailboxes
            .get()
            .map(metrics::last_published)
            .unwrap_or_default();
        HttpResponse::new(200)
            .header("Content-Type", metrics::CONTENT_TYPE)
            .body(metrics::encode(&snapshot))
    }
}

impl<H: Handler> App for HandlerApp<H> {
    type State = H::State;

    fn upgrade(&self, req: &Request<'_>, defer: DeferKey) -> Verdict<H::State> {
        let mut upgrade = Upgrade::new(defer);
        match self.handler.on_upgrade(req, &mut upgrade) {
            Decision::Accept(state) => {
                let options = upgrade.options;
                Verdict::Accept(Accept {
                    state,
                    protocol: options.protocol,
                    compress: !options.no_compression,
                    headers: options.headers,
                })
            }
            Decision::Reject(response) => {
                let mut bytes = Vec::new();
                response.write(&mut bytes, true, false);
                Verdict::Reject(bytes)
            }
            // `defer` took the key.
            Decision::Defer if upgrade.key.is_none() => Verdict::Defer,
            Decision::Defer => {
                tracing::warn!("on_upgrade returned Decision::Defer without Upgrade::defer");
                let mut bytes = Vec::new();
                HttpError::InternalServerError.write_response(&mut bytes);
                Verdict::Reject(bytes)
            }
        }
    }

    fn http(&self, req: &Request<'_>, keep_alive: bool, out: &mut Vec<u8>) -> bool {
        let builtin =
            self.metrics_path.as_deref() == Some(req.path_only()) && req.method() == "GET";
        let response = if builtin {
            Some(self.answer_metrics())
        } else {
            self.handler.on_http(req)
        };
        match response {
            Some(response) => {
                let close = !keep_alive || response.close;
                response.write(out, close, req.method() == "HEAD");
                !close
            }
            None => {
                HttpError::UpgradeRequired.write_response(out);
                false
            }
        }
    }

    #[inline]
    fn open(&self, session: Session<'_, H::State>) {
        self.handler.on_open(&mut Ws { session });
    }

    #[inline]
    fn deliver(&self, session: Session<'_, H::State>, delivery: Delivery<'_>) {
        let ws = &mut Ws { session };
        match delivery {
            Delivery::Text(text) => self.handler.on_message(ws, Message::Text(text)),
            Delivery::Binary(bytes) => self.handler.on_message(ws, Message::Binary(bytes)),
            Delivery::Fragment {
                text,
                data,
                first,
                last,
            } => self.handler.on_fragment(ws, text, data, first, last),
            Delivery::Ping(payload) => self.handler.on_ping(ws, payload),
            Delivery::Pong(payload) => self.handler.on_pong(ws, payload),
        }
    }

    #[inline]
    fn drain(&self, session: Session<'_, H::State>) {
        self.handler.on_drain(&mut Ws { session });
    }

    fn close(&self, session: Session<'_, H::State>, code: Option<CloseCode>, reason: &str) {
        self.handler.on_close(&mut Ws { session }, code, reason);
    }
}
