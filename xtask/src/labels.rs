//! The labels the xtask puts on what it makes, which `clean` looks for.

/// The label on every image the xtask builds (and on the BuildKit image it
/// makes where the official one cannot be pulled). An image built `FROM`
/// one inherits it, so `clean` also wants a tag of the image's own version
/// label (the tag the xtask gave it).
pub const MADE_LABEL: &str = "org.aiq.xtask.made";

/// The label on everything `builder up` makes, in the cluster and in
/// Docker: `builder down` deletes a namespace only when it carries it.
pub const BUILDER_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "aiq-xtask-builder");
