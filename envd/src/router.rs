//! Maps a method and URL path to a route: 404 for unknown paths, 405 (with
//! the allowed methods) for known paths with the wrong method.

use wrenn_http::{percent_decode, ApiError, Method};

/// Every endpoint of the API. Process routes carry the pid-or-tag selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    Init,
    ProcessStart,
    ProcessList,
    ProcessInfo(String),
    ProcessEvents(String),
    ProcessStdin(String),
    ProcessStdinClose(String),
    ProcessSignal(String),
    ProcessResize(String),
    FileRead,
    FileWrite,
    FileDelete,
    FsStat,
    FsList,
    FsMkdir,
    FsMove,
    FsWatch,
}

impl Route {
    /// Routes that may run for long (streams, uploads, downloads, big tree
    /// operations). They get their own thread instead of a pool worker.
    pub fn is_long_running(&self) -> bool {
        matches!(
            self,
            Route::ProcessStart
                | Route::ProcessEvents(_)
                | Route::ProcessStdin(_)
                | Route::FileRead
                | Route::FileWrite
                | Route::FileDelete
                | Route::FsMove
                | Route::FsWatch
        )
    }
}

/// Resolves `method` + `path` (without query) to a route.
pub fn resolve(method: &Method, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(&percent_decode(s, false)).into_owned())
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let chosen = match segments.as_slice() {
        ["health"] => get_or_head(method, Route::Health),
        ["metrics"] => only(method, Method::Get, Route::Metrics),
        ["init"] => only(method, Method::Post, Route::Init),
        ["processes"] => match method {
            Method::Get => Ok(Route::ProcessList),
            Method::Post => Ok(Route::ProcessStart),
            _ => Err("GET, POST"),
        },
        ["processes", sel] => only(method, Method::Get, Route::ProcessInfo(sel.to_string())),
        ["processes", sel, action] => {
            process_action(method, sel, action).ok_or_else(|| not_found(path))?
        }
        ["processes", sel, "stdin", "close"] => only(
            method,
            Method::Post,
            Route::ProcessStdinClose(sel.to_string()),
        ),
        ["files"] => match method {
            Method::Get | Method::Head => Ok(Route::FileRead),
            Method::Put | Method::Post => Ok(Route::FileWrite),
            Method::Delete => Ok(Route::FileDelete),
            _ => Err("GET, HEAD, PUT, POST, DELETE"),
        },
        ["fs", "stat"] => only(method, Method::Get, Route::FsStat),
        ["fs", "list"] => only(method, Method::Get, Route::FsList),
        ["fs", "mkdir"] => only(method, Method::Post, Route::FsMkdir),
        ["fs", "move"] => only(method, Method::Post, Route::FsMove),
        ["fs", "watch"] => only(method, Method::Get, Route::FsWatch),
        _ => return Err(not_found(path)),
    };
    chosen.map_err(|allow| ApiError::method_not_allowed(method.as_str(), path, allow))
}

fn process_action(method: &Method, sel: &str, action: &str) -> Option<Result<Route, &'static str>> {
    let sel = sel.to_string();
    Some(match action {
        "events" => only(method, Method::Get, Route::ProcessEvents(sel)),
        "stdin" => only(method, Method::Post, Route::ProcessStdin(sel)),
        "signal" => only(method, Method::Post, Route::ProcessSignal(sel)),
        "resize" => only(method, Method::Post, Route::ProcessResize(sel)),
        _ => return None,
    })
}

fn only(method: &Method, wanted: Method, route: Route) -> Result<Route, &'static str> {
    if *method == wanted {
        return Ok(route);
    }
    Err(match wanted {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        _ => "GET",
    })
}

fn get_or_head(method: &Method, route: Route) -> Result<Route, &'static str> {
    match method {
        Method::Get | Method::Head => Ok(route),
        _ => Err("GET, HEAD"),
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint at {path}; see docs/envd-api.md for the API"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve_with_selectors() {
        assert_eq!(resolve(&Method::Get, "/health").ok(), Some(Route::Health));
        assert_eq!(
            resolve(&Method::Post, "/processes/web%2D1/signal").ok(),
            Some(Route::ProcessSignal("web-1".into()))
        );
        assert_eq!(
            resolve(&Method::Post, "/processes/12/stdin/close").ok(),
            Some(Route::ProcessStdinClose("12".into()))
        );
        assert_eq!(resolve(&Method::Put, "/files").ok(), Some(Route::FileWrite));
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert_eq!(
            resolve(&Method::Get, "/nope").map_err(|e| e.status()),
            Err(404)
        );
        assert_eq!(
            resolve(&Method::Get, "/processes/1/nope").map_err(|e| e.status()),
            Err(404)
        );
        let wrong = resolve(&Method::Delete, "/health").unwrap_err();
        assert_eq!(wrong.status(), 405);
        assert_eq!(wrong.allow(), Some("GET, HEAD"));
    }

    #[test]
    fn error_answers_read_back_as_the_wire_error_body() {
        let Err(error) = resolve(&Method::Get, "/nope") else {
            panic!("/nope must not resolve");
        };
        let json = error.to_json();
        let body: envd_api::ErrorBody =
            serde_json::from_value(json.clone()).expect("envd's error body has the wire shape");
        assert_eq!(body.error.code, "not_found");
        assert_eq!(body.error.message, error.message());
        assert_eq!(serde_json::to_value(&body).ok(), Some(json));
    }
}
