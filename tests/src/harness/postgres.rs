//! Re-exported from `stillpoint_lab::servers::postgres` (which `stillpoint demo`
//! shares), plus a per-test database helper.
pub use stillpoint_lab::servers::postgres::*;

/// Drops and recreates database `name` on `server` (tests isolate themselves
/// by database), runs `ddl` in it, and returns a client connected to it.
pub async fn fresh_database(server: &PgServer, name: &str, ddl: &str) -> tokio_postgres::Client {
    let connect = |db: &str| {
        let conninfo = server.conninfo(db);
        async move {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connecting to the test server");
            tokio::spawn(connection);
            client
        }
    };
    let admin = connect("postgres").await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let client = connect(name).await;
    client.batch_execute(ddl).await.unwrap();
    client
}
