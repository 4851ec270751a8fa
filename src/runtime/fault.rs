//! Fault isolation: every handler callback runs under [`guard`], so a panic in application
//! code costs its connection, never the shard. The panic message is captured by a panic hook
//! (chained in front of whatever hook the process has) and handed to the shard, which logs
//! it once with the peer's address; panics anywhere else go to the previous hook as before.
//! A panic inside a callback that the application catches itself is not printed either.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// A guarded callback is running on this thread.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic inside a guarded callback.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Chains our hook in front of the process's panic hook (once per process).
pub(crate) fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if GUARDED.get() {
                MESSAGE.set(Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it is caught and its message returned.
#[inline]
pub(crate) fn guard<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // A panic the application caught itself leaves its message here: forget it, so it is
    // not reported for a later `resume_unwind` (which skips the hook).
    if MESSAGE.with_borrow(Option::is_some) {
        MESSAGE.set(None);
    }
    let outer = GUARDED.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.set(outer);
    result.map_err(|payload| MESSAGE.take().unwrap_or_else(|| payload_message(&*payload)))
}

/// The text of a panic payload (`&str` or `String`, as `panic!` makes them).
pub(crate) fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_with_its_message_and_location() {
        install_hook();
        assert_eq!(guard(|| 7), Ok(7));
        let err = guard(|| panic!("boom {}", 42)).unwrap_err();
        assert!(err.contains("boom 42"), "{err}");
        assert!(err.contains("fault.rs"), "location included: {err}");
        assert_eq!(guard(|| "after"), Ok("after"), "usable again");
    }
}
