//! The gRPC edge of the auth service.

use std::sync::Arc;

use medai_proto::auth::v1::auth_service_server::AuthService;
use medai_proto::auth::v1::{
    GetSigningKeysRequest, GetSigningKeysResponse, JsonWebKey, LoginRequest, LoginResponse,
};
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::error::AuthError;
use crate::keys::published_keys;
use crate::login::LoginService;

pub struct AuthApi {
    pub login: Arc<LoginService>,
    pub connection: DatabaseConnection,
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let correlation_id = medai_runtime::correlation::correlation_id(request.metadata());
        let request = request.into_inner();
        let issued = self
            .login
            .login(&request.username, &request.password, &correlation_id)
            .await?;
        Ok(Response::new(LoginResponse {
            access_token: issued.access_token,
            expires_in_seconds: issued.expires_in_seconds,
            role: issued.role.as_str().to_owned(),
        }))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<GetSigningKeysRequest>,
    ) -> Result<Response<GetSigningKeysResponse>, Status> {
        let keys = published_keys(&self.connection)
            .await
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let keys = keys
            .into_iter()
            .map(|key| JsonWebKey {
                kty: key.kty,
                crv: key.crv,
                x: key.x,
                kid: key.kid,
                alg: key.alg,
                r#use: "sig".to_owned(),
            })
            .collect();
        Ok(Response::new(GetSigningKeysResponse { keys }))
    }
}
