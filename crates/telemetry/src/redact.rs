//! What a connection string may show in a log line or an error message.
//!
//! Every URL the services print goes through [`redact_url`]: the password
//! of `user:password@` and the value of every query parameter that carries a
//! secret (`?password=`, `?sslpassword=`, tokens, API keys). Postgres and
//! AMQP both accept a password in the query string, so hiding the userinfo
//! alone is not enough.

/// What replaces a secret.
pub const HIDDEN: &str = "***";

/// `url` with every credential replaced by `***`; the rest (scheme, user,
/// host, port, path, harmless parameters) stays, because that is what an
/// operator needs to see which server was meant.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(end) => (&url[..end + 3], &url[end + 3..]),
        None => ("", url),
    };
    // The authority ends at the first '/', '?' or '#'; userinfo may not
    // contain those unencoded, but may contain '@' (so the last one counts).
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].split_once(':') {
            Some((user, _password)) => format!("{user}:{HIDDEN}{}", &authority[at..]),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (path, query_and_fragment) = match tail.find('?') {
        Some(q) => tail.split_at(q),
        None => (tail, ""),
    };
    let mut out = format!("{scheme}{authority}{path}");
    if let Some(query_and_fragment) = query_and_fragment.strip_prefix('?') {
        let (query, fragment) = match query_and_fragment.find('#') {
            Some(hash) => query_and_fragment.split_at(hash),
            None => (query_and_fragment, ""),
        };
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((key, _value)) if is_secret_key(key) => format!("{key}={HIDDEN}"),
                _ => parameter.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&parameters.join("&"));
        out.push_str(fragment);
    }
    out
}

/// Query parameters whose value is a credential. Postgres takes `password`
/// and `sslpassword` (libpq); the rest are the usual spellings elsewhere.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("token")
        || matches!(
            key.as_str(),
            "pass" | "passwd" | "pwd" | "apikey" | "api_key" | "api-key" | "auth"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_of_the_userinfo_is_hidden() {
        assert_eq!(
            redact_url("postgres://eo:secret@127.0.0.1:5432/postgres"),
            "postgres://eo:***@127.0.0.1:5432/postgres"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        // An '@' inside the password: everything up to the last one is userinfo.
        assert_eq!(
            redact_url("postgres://eo:p@ss@db:5432/x"),
            "postgres://eo:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://eo@db/x"), "postgres://eo@db/x");
        assert_eq!(
            redact_url("postgres://127.0.0.1/x"),
            "postgres://127.0.0.1/x"
        );
    }

    #[test]
    fn secrets_in_the_query_string_are_hidden() {
        assert_eq!(
            redact_url("postgres://eo@127.0.0.1/x?password=hunter2&sslmode=disable"),
            "postgres://eo@127.0.0.1/x?password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://127.0.0.1/x?sslmode=require&sslpassword=k3y&user=eo"),
            "postgres://127.0.0.1/x?sslmode=require&sslpassword=***&user=eo"
        );
        assert_eq!(
            redact_url("postgres://a:b@h/x?PassWord=c"),
            "postgres://a:***@h/x?PassWord=***"
        );
        assert_eq!(
            redact_url("amqp://h:5672/%2f?auth_token=t&heartbeat=10#frag"),
            "amqp://h:5672/%2f?auth_token=***&heartbeat=10#frag"
        );
        // No path before the query.
        assert_eq!(
            redact_url("postgres://h?password=x"),
            "postgres://h?password=***"
        );
    }

    #[test]
    fn nothing_secret_is_left_alone() {
        for url in [
            "http://127.0.0.1:9324",
            "postgres://eo@127.0.0.1:5432/postgres?sslmode=disable",
            "127.0.0.1:9092",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
