//! Portico's built-in plugins, one file each. Adding one = a module here + a line in
//! [`register_builtins`].

pub mod aggregate;
pub mod allow_services;
pub mod api_key;
pub mod canary;
pub mod cors;
pub mod headers;
pub mod ip_filter;
pub mod jwt;
pub mod limit;
pub mod mirror;
pub mod quota;
pub mod rate_limit;
pub mod transform;

use crate::plugin::Registry;

pub fn register_builtins(r: &mut Registry) {
    r.register("aggregate", aggregate::Aggregate::new);
    r.register("allow_services", allow_services::AllowServices::new);
    r.register("api_key", api_key::ApiKey::new);
    r.register("canary", canary::Canary::new);
    r.register("cors", cors::Cors::new);
    r.register("headers", headers::Headers::new);
    r.register("ip_filter", ip_filter::IpFilter::new);
    r.register("jwt", jwt::Jwt::new);
    r.register("mirror", mirror::Mirror::new);
    r.register("quota", quota::Quota::new);
    r.register("rate_limit", rate_limit::RateLimit::new);
    r.register("transform", transform::TransformPlugin::new);
}
