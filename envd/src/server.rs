//! envd's HTTP server: wrenn-http's server (worker pool, long-running
//! threads, socket options, accept recovery) with envd's name, routes and
//! access token. Streams, uploads, downloads and big tree operations are the
//! long-running requests.

use wrenn_http::{
    ApiError, Exchange, Handler, Listen, Method, Reply, Server, ServerConfig, StartupError,
};

use crate::app::App;
use crate::auth;
use crate::fs::api as files;
use crate::process::api as processes;
use crate::router::{self, Route};
use crate::system;

/// Serves the API on `listen` until the process is killed.
pub fn run(listen: &str) -> Result<(), StartupError> {
    let config = ServerConfig {
        bind_hint: Some("pick another address with --listen or ENVD_LISTEN"),
        ..ServerConfig::new(
            "envd",
            env!("CARGO_PKG_VERSION"),
            Listen::Tcp(listen.to_owned()),
        )
    };
    Server::bind(config, App::default())?.run()
}

impl Handler for App {
    fn is_long_running(&self, method: &Method, path: &str) -> bool {
        router::resolve(method, path).is_ok_and(|route| route.is_long_running())
    }

    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        let route = router::resolve(ex.method(), ex.path());
        if !matches!(route, Ok(Route::Health)) {
            auth::check(self.settings.read().access_token.as_deref(), ex)?;
        }
        let settings = &self.settings;
        let registry = &self.processes;
        match route? {
            Route::Health => Ok(system::health()),
            Route::Metrics => system::metrics(&self.cpu),
            Route::Init => system::init(settings, ex),
            Route::ProcessStart => processes::start(registry, settings, ex),
            Route::ProcessList => Ok(processes::list(registry)),
            Route::ProcessInfo(sel) => processes::info(registry, &sel),
            Route::ProcessEvents(sel) => processes::events(registry, ex, &sel),
            Route::ProcessStdin(sel) => processes::write_stdin(registry, ex, &sel),
            Route::ProcessStdinClose(sel) => processes::close_stdin(registry, &sel),
            Route::ProcessSignal(sel) => processes::signal(registry, ex, &sel),
            Route::ProcessResize(sel) => processes::resize(registry, ex, &sel),
            Route::FileRead => files::download(settings, ex),
            Route::FileWrite => files::upload(settings, ex),
            Route::FileDelete => files::delete(settings, ex),
            Route::FsStat => files::stat(settings, ex),
            Route::FsList => files::list(settings, ex),
            Route::FsMkdir => files::mkdir(settings, ex),
            Route::FsMove => files::move_path(settings, ex),
            Route::FsWatch => files::watch(settings, ex),
        }
    }
}
