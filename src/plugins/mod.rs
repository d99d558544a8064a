//! Portico's built-in plugins, one file each. Adding one = a module here + a line in
//! [`register_builtins`].

pub mod headers;

use crate::plugin::Registry;

pub fn register_builtins(r: &mut Registry) {
    r.register("headers", headers::Headers::new);
}
